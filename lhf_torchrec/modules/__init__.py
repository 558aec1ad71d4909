"""Unsharded TorchRec modules: the learned-hash EmbeddingBagCollection and the model swap."""

from lhf_torchrec.modules.learned_hash_ebc import IdRemapper, LearnedHashEmbeddingBagCollection, compressed_configs

__all__ = ["IdRemapper", "LearnedHashEmbeddingBagCollection", "compressed_configs"]
