"""FlashAttention for JAX: exact attention in linear memory."""

from jax_flash import _cuda
from jax_flash.attention import flash_attention
from jax_flash.block_sparse import BlockSparseMask
from jax_flash.dropout import dropout_mask
from jax_flash.reference import attention_reference
from jax_flash.ring import ring_attention, zigzag_permute, zigzag_unpermute

__version__ = "0.1.0"

_cuda.check_library()

__all__ = ["BlockSparseMask", "attention_reference", "dropout_mask", "flash_attention", "ring_attention",
           "zigzag_permute", "zigzag_unpermute", "__version__"]
