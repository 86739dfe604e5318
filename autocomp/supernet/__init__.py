"""Weight-sharing supernets: dynamic ops (ops), the Supernet module (supernet), training (train)
and BatchNorm recalibration (bn)."""
