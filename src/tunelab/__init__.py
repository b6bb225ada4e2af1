"""tunelab: fine-tune small language models for real tasks, on CPU or GPU."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT whenever it is installed) tries to fetch a faster CPU kernel from the model hub
# and warns on every start when it cannot; its built-in CPU path works, so the warning is noise for tunelab users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
