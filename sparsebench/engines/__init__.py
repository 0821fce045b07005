"""How a training step is executed: the local engine and the DeepSpeed engine."""
