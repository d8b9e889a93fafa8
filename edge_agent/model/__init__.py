"""Infer and score: the bundle on disk, the Scorer (ONNX Runtime features -> FAISS kNN against
the memory bank) and the pure scoring maths (image score, anomaly map, regions)."""
