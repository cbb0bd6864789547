"""What regdit reads and writes: checkpoints and exports (checkpoint, official), prepared datasets
(data, images), the frozen parts of the method (vae, encoders), and where files come from (hub,
downloads)."""
