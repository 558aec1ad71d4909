"""Unsharded TorchRec modules: the learned-hash EmbeddingBagCollection, its quantized inference twin, the model swap."""

from lhf_torchrec.modules.learned_hash_ebc import IdRemapper, LearnedHashEmbeddingBagCollection, compressed_configs
from lhf_torchrec.modules.quant import QuantLearnedHashEmbeddingBagCollection, quantize_learned_hash_ebc
from lhf_torchrec.modules.swap import apply_learned_hashing

__all__ = [
    "IdRemapper", "LearnedHashEmbeddingBagCollection", "QuantLearnedHashEmbeddingBagCollection",
    "apply_learned_hashing", "compressed_configs", "quantize_learned_hash_ebc",
]
