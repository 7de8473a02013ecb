"""The networks: the registration network, its blocks, the baselines behind its interface, ONNX Runtime."""
