"""The serving engine both OpenAI-compatible servers use, `tunelab serve` and `tunelab service`'s chat route: the
request schema and its validation (`schemas`), OpenAI-shaped errors (`errors`), models and adapters on PyTorch or
ONNX Runtime (`engines`, `adapters`), sampling and streamed text (`generation`), and a request's prompt, budget,
response and chunks (`completions`). The servers route HTTP to it and add what is theirs (API keys, tenancy).

Import from the submodules: this package stays empty so that `tunelab`'s command line starts without torch.
"""
