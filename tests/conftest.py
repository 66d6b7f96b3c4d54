"""Fixtures shared by the test modules. Helpers that take arguments (tiny models, inputs, slice
lists) live in ``_prune_helpers.py`` and ``_tokens_helpers.py`` and are imported by name."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (bitwise-reproducible reductions), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_vit():
    """A two-block timm ViT on 16 px inputs (4 px patches, width 16, 2 heads, 3 classes), eval mode."""
    import timm
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, depth=2, embed_dim=16, num_heads=2,
                             num_classes=3).eval()
