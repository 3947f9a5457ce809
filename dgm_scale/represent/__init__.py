"""Using what a trained model learned: `dgm-scale encode` (encode.py: features of real data as an
.npz) and `dgm-scale probe` (probe.py: clustering and few-label linear probes of those features
next to raw pixels and PCA). The families provide the features (`encode_features`); the parser
(cli.py) imports neither torch nor scikit-learn."""
