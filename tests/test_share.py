"""``deitlab push`` / ``deitlab pull`` (share/): the staged folder is what timm's hf-hub: loader reads
(a Hugging Face cache built from it loads offline to identical logits), pull from a local folder and
from the cache gives a run directory that loads to identical logits, push talks to ``HfApi`` as it
should, and the model card says what the records say. Nothing here reaches a network: the Hub's
offline mode is on for every test."""
import dataclasses
import json
import shlex
import shutil

import pytest
import torch

from deitlab.cli import main, make_parser
from deitlab.rundir import create, save_run_dir

PICO = 'deitlab_deit_pico_patch4_32'
GLYPHS = 'glyphs:train=64,val=32,size=32'
COMMIT = '0123456789abcdef0123456789abcdef01234567'


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """The Hub's offline mode (huggingface_hub reads HF_HUB_OFFLINE when imported: the constant is
    set), an empty cache, no token."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr('huggingface_hub.get_token', lambda: None)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A run directory as deitlab train writes it (one step): config.json, model.safetensors,
    train_config.json, metrics.jsonl, checkpoint.pt."""
    out = tmp_path_factory.mktemp('share') / 'run'
    assert main(['train', '--model', PICO, '--data', GLYPHS, '--epochs', '1', '--batch-size', '16', '--recipe', 'short',
                 '--no-progress', '--no-tensorboard', '--max-steps-per-epoch', '1', '--seed', '3', '--out',
                 str(out), '--quiet']) == 0
    return out


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _logits(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(torch.randn(3, 3, 32, 32))


def _cache(stage, root, repo_id='alice/pico-glyphs'):
    """The Hugging Face cache layout of a repository holding the staged files, at commit COMMIT."""
    repo = root / ('models--' + repo_id.replace('/', '--'))
    shutil.copytree(stage, repo / 'snapshots' / COMMIT)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)
    return root


def test_dry_run_stages_what_timm_hf_hub_loads_to_identical_logits(trained, tmp_path, capsys):
    import timm
    stage = tmp_path / 'stage'
    assert main(['push', str(trained), 'alice/pico-glyphs', '--dry-run', '--stage', str(stage), '--json']) == 0
    res = _last_json(capsys)
    files = ['README.md', 'config.json', 'metrics.jsonl', 'model.safetensors', 'train_config.json']
    assert res['files'] == files and sorted(p.name for p in stage.iterdir()) == files   # no checkpoint.pt
    assert res['dry_run'] and res['load_with'] == 'hf-hub:alice/pico-glyphs' and res['architecture'] == PICO
    assert res['params'] == sum(p.numel() for p in create(str(trained)).parameters()) and res['gmacs'] > 0
    config = json.loads((stage / 'config.json').read_text())
    assert config['architecture'] == PICO and config['pretrained_cfg']['architecture'] == PICO
    assert (stage / 'model.safetensors').read_bytes() == (trained / 'model.safetensors').read_bytes()

    cache = _cache(stage, tmp_path / 'cache')
    hub = timm.create_model('hf-hub:alice/pico-glyphs', pretrained=True, cache_dir=str(cache))
    assert hub.pretrained_cfg['hf_hub_id'] == 'alice/pico-glyphs'
    assert torch.equal(_logits(hub), _logits(create(str(trained))))
    assert hub.pretrained_cfg['label_names'][:2] == ['alpha', 'beta']


def test_pull_of_a_local_folder_is_a_run_directory_with_identical_logits(trained, tmp_path, capsys):
    import timm
    stage = tmp_path / 'stage'
    assert main(['push', str(trained), 'alice/pico-glyphs', '--dry-run', '--stage', str(stage), '--quiet']) == 0
    capsys.readouterr()
    out = tmp_path / 'pulled' / 'run'
    assert main(['pull', str(stage), '--out', str(out), '--json']) == 0
    res = _last_json(capsys)
    assert res['local'] and res['run_dir'] == str(out) and res['load_with'] == f'local-dir:{out}'
    assert 'README.md' in res['files'] and (out / 'model.safetensors').is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith('.')]   # the temporary folder is gone
    pulled = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(_logits(pulled), _logits(create(str(trained))))
    # an empty --out is fine too; a non-empty one is refused and left as it was
    (tmp_path / 'empty').mkdir()
    assert main(['pull', str(stage), '--out', str(tmp_path / 'empty'), '--quiet']) == 0
    assert main(['pull', str(stage), '--out', str(out)]) == 2
    assert 'exists and is not empty' in capsys.readouterr().err


def test_pull_offline_from_the_hugging_face_cache(trained, tmp_path, capsys):
    from huggingface_hub import constants
    stage = tmp_path / 'stage'
    assert main(['push', str(trained), 'alice/pico-glyphs', '--dry-run', '--stage', str(stage), '--quiet']) == 0
    _cache(stage, __import__('pathlib').Path(constants.HF_HUB_CACHE))
    out = tmp_path / 'from-cache'
    capsys.readouterr()
    assert main(['pull', 'alice/pico-glyphs', '--out', str(out), '--json']) == 0
    res = _last_json(capsys)
    assert not res['local'] and res['revision'] == 'main' and res['architecture'] == PICO
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in stage.iterdir())
    assert torch.equal(_logits(create(str(out))), _logits(create(str(trained))))
    assert main(['pull', 'alice/never-pushed', '--out', str(tmp_path / 'x')]) == 2
    assert 'offline (HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


class FakeApi:
    """Records what push asks of ``HfApi`` (the upload folder's files and card, read during the call)."""
    calls = []

    def __init__(self, endpoint=None, token=None):
        self.calls.append(('init', dict(endpoint=endpoint, token=token)))

    def create_repo(self, repo_id, **kw):
        self.calls.append(('create_repo', dict(repo_id=repo_id, **kw)))
        return f'{kw.get("endpoint") or "https://hub.test"}/{repo_id}'

    def create_branch(self, repo_id, **kw):
        self.calls.append(('create_branch', dict(repo_id=repo_id, **kw)))

    def upload_folder(self, repo_id, folder_path, **kw):
        from pathlib import Path
        folder = Path(folder_path)
        self.calls.append(('upload_folder', dict(repo_id=repo_id, files=sorted(p.name for p in folder.iterdir()),
                                                 card=(folder / 'README.md').read_text(), **kw)))
        return type('CommitInfo', (), dict(oid=COMMIT, commit_url=f'https://hub.test/{repo_id}/commit/{COMMIT}'))()


def test_push_creates_the_repository_and_uploads_the_folder(trained, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)   # FakeApi sends nothing
    FakeApi.calls = []
    monkeypatch.setattr('huggingface_hub.HfApi', FakeApi)
    monkeypatch.setattr('huggingface_hub.get_token', lambda: 'hf_test_token')
    assert main(['push', str(trained), 'alice/pico-glyphs', '--private', '--revision', 'dev', '--endpoint',
                 'http://127.0.0.1:9', '--license', 'mit', '--json']) == 0
    res = _last_json(capsys)
    kinds = [c[0] for c in FakeApi.calls]
    assert kinds == ['init', 'create_repo', 'create_branch', 'upload_folder']
    init, repo, branch, upload = (c[1] for c in FakeApi.calls)
    assert init == dict(endpoint='http://127.0.0.1:9', token='hf_test_token')
    assert repo == dict(repo_id='alice/pico-glyphs', repo_type='model', private=True, exist_ok=True)
    assert branch == dict(repo_id='alice/pico-glyphs', branch='dev', repo_type='model', exist_ok=True)
    assert upload['files'] == res['files'] == ['README.md', 'config.json', 'metrics.jsonl', 'model.safetensors',
                                               'train_config.json']
    assert upload['revision'] == 'dev' and PICO in upload['commit_message']
    assert 'license: mit' in upload['card'] and "hf-hub:alice/pico-glyphs'" in upload['card']
    assert res['commit'] == COMMIT and res['load_with'] == 'hf-hub:alice/pico-glyphs@dev' and not res['dry_run']
    assert not list(trained.glob('README.md'))   # the run directory is not written to
    # without --private an existing repository keeps its visibility, and main needs no branch
    FakeApi.calls = []
    assert main(['push', str(trained), 'alice/pico-glyphs', '--quiet']) == 0
    assert [c[0] for c in FakeApi.calls] == ['init', 'create_repo', 'upload_folder']
    assert FakeApi.calls[1][1]['private'] is None and FakeApi.calls[2][1]['revision'] is None


def test_push_without_a_token_says_how_to_log_in_and_sends_nothing(trained, monkeypatch, capsys):
    FakeApi.calls = []
    monkeypatch.setattr('huggingface_hub.HfApi', FakeApi)
    assert main(['push', str(trained), 'alice/pico-glyphs']) == 2
    err = capsys.readouterr().err
    assert 'deitlab: error: no Hugging Face token: log in with `hf auth login`' in err
    assert 'or set the HF_TOKEN environment variable' in err and FakeApi.calls == []


@pytest.mark.parametrize('status, expected', [(401, r'refused the token while uploading to alice/pico-glyphs \(401\): '
                                                     r'log in with `hf auth login`'),
                                              (403, r'refused to let this token write to alice/pico-glyphs \(403\)'),
                                              (500, r'uploading to alice/pico-glyphs on http://hub.test failed '
                                                    r'\(HfHubHTTPError: boom\)')])
def test_the_hubs_refusals_are_one_line(trained, monkeypatch, capsys, status, expected):
    import sys
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)   # Refusing sends nothing
    from huggingface_hub.errors import HfHubHTTPError, Response   # Response: the HTTP library's, whichever it is
    http = sys.modules[Response.__module__.split('.')[0]]

    class Refusing(FakeApi):
        def upload_folder(self, repo_id, folder_path, **kw):
            raise HfHubHTTPError('boom', response=http.Response(status, request=http.Request('POST', 'http://x')))
    monkeypatch.setattr('huggingface_hub.HfApi', Refusing)
    monkeypatch.setattr('huggingface_hub.get_token', lambda: 'hf_test_token')
    assert main(['push', str(trained), 'alice/pico-glyphs', '--endpoint', 'http://hub.test']) == 2
    err = capsys.readouterr().err
    assert __import__('re').search(expected, err) and 'Traceback' not in err, err


def test_push_while_offline_is_refused_before_anything_is_sent(trained, monkeypatch, capsys):
    FakeApi.calls = []
    monkeypatch.setattr('huggingface_hub.HfApi', FakeApi)
    monkeypatch.setattr('huggingface_hub.get_token', lambda: 'hf_test_token')
    assert main(['push', str(trained), 'alice/pico-glyphs']) == 2
    assert 'HF_HUB_OFFLINE is set: nothing can be uploaded' in capsys.readouterr().err and FakeApi.calls == []


def test_round_trip_through_a_local_hub_endpoint(trained, tmp_path, monkeypatch, capsys):
    """push --endpoint and pull --endpoint through huggingface_hub's HTTP calls to a Hub on 127.0.0.1
    (tests/_hub_server.py), then timm's hf-hub: loader downloads the model from it: identical logits."""
    import timm
    from huggingface_hub import constants
    from _hub_server import LocalHub
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr('huggingface_hub.get_token', lambda: 'hf_local_token')
    with LocalHub() as hub:
        assert main(['push', str(trained), 'alice/pico-glyphs', '--endpoint', hub.url, '--revision', 'v1',
                     '--json']) == 0
        pushed = _last_json(capsys)
        assert pushed['commit'] in pushed['commit_url'] and pushed['url'] == f'{hub.url}/alice/pico-glyphs'
        assert hub.requests[:3] == [('POST', '/api/repos/create'), ('POST', '/api/models/alice/pico-glyphs/branch/v1'),
                                    ('POST', '/api/validate-yaml')]   # the Hub checks the card's front matter
        assert set(hub.tokens) == {'Bearer hf_local_token'} and len(hub.cards) == 1
        assert sorted(hub.commits[pushed['commit']]) == pushed['files']

        out = tmp_path / 'pulled'
        assert main(['pull', 'alice/pico-glyphs', '--endpoint', hub.url, '--revision', 'v1', '--out', str(out),
                     '--json']) == 0
        assert _last_json(capsys)['files'] == pushed['files'] and not (out / '.cache').exists()
        assert torch.equal(_logits(create(str(out))), _logits(create(str(trained))))
        assert main(['pull', 'alice/nothing', '--endpoint', hub.url, '--out', str(tmp_path / 'no')]) == 2
        assert f'no model repository alice/nothing on {hub.url}' in capsys.readouterr().err

        monkeypatch.setattr(constants, 'ENDPOINT', hub.url)   # where timm's hf_hub_download goes
        monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                            hub.url + '/{repo_id}/resolve/{revision}/{filename}')
        model = timm.create_model('hf-hub:alice/pico-glyphs@v1', pretrained=True, cache_dir=str(tmp_path / 'cache'))
        assert torch.equal(_logits(model), _logits(create(str(trained))))
        assert ('GET', '/alice/pico-glyphs/resolve/v1/model.safetensors') in hub.requests


def _fake_prune_report(run, method='nvit'):
    """A report.json with the fields deitlab prune writes (rows, target, settings, steps, fine-tuning)."""
    from deitlab.prune.config import NViTConfig, OFBConfig
    cls = NViTConfig if method == 'nvit' else OFBConfig
    settings = dataclasses.asdict(cls(model='/home/someone/runs/dense', data='folder:/data/birds', out=str(run),
                                      target_gmacs=0.5, batch_size=8, lam=0.0, group_sizes={'mlp': 16},
                                      prune_types=('head', 'mlp')) if method == 'nvit' else
                                  cls(model='/home/someone/runs/dense', data='folder:/data/birds', out=str(run),
                                      target_gmacs=0.5, batch_size=8, pmim=False))
    report = dict(rows=[dict(name='dense', params_m=0.209, gmacs=0.0151, top1=81.5),
                        dict(name=method, params_m=0.156, gmacs=0.0105, top1=79.25)],
                  target=dict(kind='gmacs', value=0.5), config=settings, run_dir=str(run),
                  dense_dir='/home/someone/runs/dense', finetune=dict(epochs=2, val_top1=79.25),
                  **({'prune_steps': 40} if method == 'nvit' else {'search_steps': 30}))
    (run / 'report.json').write_text(json.dumps(report))
    return settings


def _parsed(command: str, cls) -> dict:
    """The configuration values the rebuilt command gives when deitlab's own parser reads it."""
    from deitlab.cli_flags import config_values, parse_kv
    argv = shlex.split(command)
    assert argv[0] == 'deitlab'
    args = make_parser([argv[1]]).parse_args(argv[1:])
    values = config_values(args, cls)
    return {k: parse_kv(v) if args.config_spec.types.get(k) is dict else v for k, v in values.items()}


@pytest.mark.parametrize('method', ['nvit', 'ofb'])
def test_the_card_of_a_pruned_run(tmp_path, method):
    import timm
    from deitlab.share.card import lineage, model_card, run_records
    from deitlab.prune.config import NViTConfig, OFBConfig
    run = save_run_dir(timm.create_model(PICO, num_classes=3), tmp_path / 'run', label_names=['a', 'b', 'c'])
    settings = _fake_prune_report(run, method)
    records = run_records(run)
    lines, command, note = lineage(records)
    assert lines[0].startswith(f'pruned with {method.upper() if method == "ofb" else "NViT"}')
    assert '`dense`' in lines[0] and '`folder:birds`' in lines[0] and 'someone' not in ' '.join(lines)
    assert note == 'rebuilt from report.json' and command.startswith(f'deitlab prune {method} --model dense ')
    assert command.endswith('--out RUN_DIR') and '/data' not in command
    values = _parsed(command, NViTConfig if method == 'nvit' else OFBConfig)
    for key, value in settings.items():   # every setting but the run's own and the shortened paths comes back
        if key not in ('model', 'data', 'out', 'progress', 'device', 'resume'):
            assert json.loads(json.dumps(values.get(key, value))) == json.loads(json.dumps(value)), key
    card = model_card('alice/pico-pruned', json.loads((run / 'config.json').read_text()), records,
                      dict(params=156000, gmacs=0.0105), license='mit')
    assert card.startswith('---\nlibrary_name: timm\nlicense: mit\n') and '- pruned\n' in card
    assert f'| {method} | 79.25 | 0.156 | 0.0105 |' in card and '| dense | 81.5 |' in card
    assert 'fine-tuned for 2 epochs with soft distillation' in card and '| labels | a, b, c |' in card


def test_the_card_of_a_trained_run_and_its_command(trained):
    from deitlab.share.card import lineage, results, run_records
    from deitlab.train.config import TrainConfig
    records = run_records(trained)
    lines, command, note = lineage(records)
    assert lines[0].startswith(f'trained from scratch (architecture `{PICO}`) on `{GLYPHS}` for 1 epoch with '
                               f"deitlab's `short` recipe (batch 16")
    assert note == 'rebuilt from train_config.json'
    assert command.startswith(f'deitlab train --recipe short --model {PICO} --data {GLYPHS} --epochs 1 ')
    values = _parsed(command, TrainConfig)
    saved = records['train_config.json']
    cfg = TrainConfig.from_recipe(values.pop('recipe'), **values)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ('out', 'device', 'progress', 'resume', 'overwrite', 'workers', 'tensorboard'):
            assert json.loads(json.dumps(getattr(cfg, f.name))) == saved[f.name], f.name
    rows, data = results(records)
    last = records['metrics.jsonl'][-1]
    assert data == GLYPHS and rows == [dict(name='this model (epoch 1)', top1=last['val_top1'], top5=last['val_top5'])]
    # a command the run recorded wins over a rebuilt one
    records['train_config.json'] = dict(saved, command=['deitlab', 'train', '--model', PICO])
    assert lineage(records)[1:] == (f'deitlab train --model {PICO}', 'as recorded')


def test_a_run_without_records_still_gets_a_card(tmp_path, capsys):
    import timm
    run = save_run_dir(timm.create_model('resnet18', num_classes=4, pretrained=False), tmp_path / 'plain-timm')
    stage = tmp_path / 'stage'
    assert main(['push', str(run), 'bob/resnet18-x', '--dry-run', '--stage', str(stage), '--quiet']) == 0
    card = (stage / 'README.md').read_text()
    assert 'the run directory holds no training records' in card and 'import deitlab' not in card
    assert '## Results' not in card and "timm.create_model('hf-hub:bob/resnet18-x', pretrained=True)" in card
    cache = _cache(stage, tmp_path / 'cache', 'bob/resnet18-x')
    hub = timm.create_model('hf-hub:bob/resnet18-x', pretrained=True, cache_dir=str(cache))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(hub.eval()(x), create(str(run)).eval()(x))


@pytest.mark.parametrize('repo_id', ['alice/pico', 'a-b.c_d/e.f-g_h', 'A1/B2'])
def test_repo_ids_the_hub_takes(repo_id):
    from deitlab.share.hub import check_repo_id
    assert check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize('repo_id', ['pico', 'alice/', '/pico', 'a/b/c', 'alice/pi co', 'alice/pi--co',
                                     'alice/pico.git', '-alice/pico', 'alice/' + 'x' * 97, 'alice/pi..co'])
def test_repo_ids_the_hub_refuses(repo_id):
    from deitlab.share import ShareError
    from deitlab.share.hub import check_repo_id
    with pytest.raises(ShareError, match='is not OWNER/NAME'):
        check_repo_id(repo_id)
