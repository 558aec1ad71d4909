"""Unsharded TorchRec modules: the remapped EBC every method uses, the learned-hash EBC, its
quantized inference twin, the co-sharded (managed-collision) twin, the model swap."""

from lhf_torchrec.modules.cosharded import CoShardedIdRemap, CoShardedLearnedHashEBC
from lhf_torchrec.modules.learned_hash_ebc import IdRemapper, LearnedHashEmbeddingBagCollection, compressed_configs
from lhf_torchrec.modules.quant import QuantLearnedHashEmbeddingBagCollection, quantize_learned_hash_ebc
from lhf_torchrec.modules.remapped_ebc import EmbeddingRemap, RemappedEmbeddingBagCollection
from lhf_torchrec.modules.swap import apply_cosharded_learned_hashing, apply_learned_hashing, apply_remap

__all__ = [
    "CoShardedIdRemap", "CoShardedLearnedHashEBC", "EmbeddingRemap", "IdRemapper", "LearnedHashEmbeddingBagCollection",
    "QuantLearnedHashEmbeddingBagCollection", "RemappedEmbeddingBagCollection", "apply_cosharded_learned_hashing",
    "apply_learned_hashing", "apply_remap", "compressed_configs", "quantize_learned_hash_ebc",
]
