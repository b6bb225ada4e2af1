"""OpenAI-compatible inference server: one base model, many adapters (or one ONNX export).

Import from the submodules (`tunelab.serve.app`, `tunelab.serve.engines`): this package stays empty so that
`tunelab`'s command line starts without loading torch and the web stack.
"""
