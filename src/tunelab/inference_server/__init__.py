"""`tunelab serve`: the OpenAI-compatible inference server's routes, API keys and metrics, on the serving engine
(`tunelab.serving`): one base model and many adapters, or one ONNX export.

Import from the submodules (`tunelab.inference_server.app`): this package stays empty so that `tunelab`'s
command line starts without loading torch and the web stack.
"""
