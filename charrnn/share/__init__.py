"""Sharing a trained model: ONNX export (``onnx``) and Hub publishing with its model card (``publish``)."""
