"""deitlab.registry: every registered choice loads, the CLI and configs read the registries, and a
new token-fusion method is one function plus one registration."""
import pytest
import timm
import torch

from deitlab import registry
from deitlab.registry import MIX_MODES, PRUNABLE, SALIENCY, TOKEN_FUSION, Registry, load_target


@pytest.mark.parametrize('reg', [TOKEN_FUSION, SALIENCY, PRUNABLE], ids=lambda r: r.kind)
def test_every_target_loads(reg):
    assert len(reg) >= 3
    for entry in reg:
        assert callable(entry.load()), entry.name
        assert entry.help


def test_prunable_classes_load_and_name_their_layout():
    from deitlab.prune.families import Layout
    for family in PRUNABLE:
        assert issubclass(family.load(), Layout)
        for spec in family['classes']:
            assert isinstance(load_target(spec), type)


def test_registry_errors_name_the_choices():
    r = Registry('colour')
    r.register('red', None, 'warm')
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        r.register('red', None, 'again')
    with pytest.raises(KeyError, match="paint must be one of red; got 'blue'"):
        r.get('blue', KeyError, 'paint')
    assert r.choices_help() == 'red'
    with pytest.raises(LookupError, match='no implementation'):
        r['red'].load()
    assert r.unregister('red').help == 'warm' and len(r) == 0


def test_mix_flags_partition_the_modes():
    assert MIX_MODES.names(attention=True) == ('transmix', 'mixpro')
    assert MIX_MODES.names(maskmix=True) == ('maskmix', 'mixpro')
    assert MIX_MODES.names(mixup=False, cutmix=False) == ('none',)


def test_cli_help_and_config_read_the_registries():
    import argparse
    from deitlab.cli import make_parser
    from deitlab.train.config import ConfigError, TrainConfig

    def subcommands(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert tuple(subcommands(subcommands(make_parser(['fuse']))['fuse'])) == TOKEN_FUSION.names()
    train_help = subcommands(make_parser(['train']))['train'].format_help()
    assert MIX_MODES.choices_help() in ' '.join(train_help.split())
    with pytest.raises(ConfigError, match='token_fusion must be one of tome, mctf, mctf-fast'):
        TrainConfig(token_fusion='tokenlearner').validate()
    with pytest.raises(ConfigError, match='mix must be one of none, mixup'):
        TrainConfig(mix='augmix').validate()


def _apply_halve(model, r, layers=None, **options):
    """A toy method for the plug-in test: ToMe with half the tokens of ``r``."""
    from deitlab.tokens.tome import apply_tome
    return apply_tome(model, r // 2, layers=layers, **options)


def test_a_new_token_fusion_method_is_one_registration():
    from deitlab.tokens.fuse import apply_token_fusion
    TOKEN_FUSION.register('halve', f'{__name__}:_apply_halve', 'toy: ToMe at r/2', default_r=8, cost='tome',
                          options={}, consistency=False)
    try:
        model = timm.create_model('deitlab_deit_pico_patch4_32').eval()
        fused = apply_token_fusion(model, 'halve')   # default_r 8 -> ToMe r = 4
        with torch.no_grad():
            fused(torch.randn(2, 3, 32, 32))
        assert fused.token_fusion.last['tokens'][-1] < 65
        assert fused.token_fusion.schedule(65, len(model.blocks))[0]['r'] == 4
    finally:
        TOKEN_FUSION.unregister('halve')
    assert 'halve' not in TOKEN_FUSION


def test_registry_module_imports_no_torch():
    import subprocess
    import sys
    code = ('import sys, deitlab.registry as r; r.TOKEN_FUSION.names(); '
            'print("torch" in sys.modules, "timm" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ['False', 'False']
    assert registry.__all__
