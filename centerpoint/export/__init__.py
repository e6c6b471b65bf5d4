"""Export the detector as one graph that runs outside this package's Python (ONNX, torch.export, TorchScript).

`prepost` holds the image geometry around the graph (letterbox in, boxes back to the image out; no torch),
`graph` the module that is exported (normalisation, network, optional decoding), `formats` the three file
formats and `files` the rule that an export replaces only a file an earlier export wrote.
"""
