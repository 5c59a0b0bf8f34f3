"""Per-modality neural encoders: tensors in, embeddings out. No I/O, no Kafka."""
