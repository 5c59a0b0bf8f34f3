"""Per-modality neural encoders: tensors in, embeddings out. No I/O, no Kafka.

Legend of the dimension names in every shape comment of encoders/ and fusion/:

    B      windows in a batch
    n      rows of the batch that have a given modality (n_m for modality m); n <= B
    M      modality slots (camera, audio, telemetry); m a count of them, 2^M coalitions
    C      classes
    D      token width: one modality's embedding fed to fusion
    E      trunk width: a CNN trunk's output (trunk_dim)
    H      hidden width of a transformers (hf) trunk
    T      frames of a camera window
    S      image side after preprocessing (I for an hf model's input side)
    N      images in one trunk call (n*T)
    F, L   log-mel bins and frames of an audio window (n_mels, frames)
    steps  telemetry time steps; 2M their channels (value and presence per metric)
"""
