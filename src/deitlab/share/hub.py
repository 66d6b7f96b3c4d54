"""``deitlab push`` and ``deitlab pull``: a run directory to and from the Hugging Face Hub.

:func:`push_run` checks everything it can before any network traffic (the repository id, the run
directory: its ``config.json`` holds ``architecture`` and ``pretrained_cfg`` and the model builds
from it with its weights; a token, unless ``dry_run``), stages the upload folder (:func:`stage_run`:
``config.json``, ``model.safetensors``, the records of :data:`~deitlab.share.card.RECORDS` present,
the generated ``README.md``), then creates the repository if needed and uploads the folder in one
commit. ``endpoint`` points ``huggingface_hub`` at another Hub (a local server, a mirror).

:func:`pull_run` fetches a repository (``snapshot_download``; with ``HF_HUB_OFFLINE=1`` from the
Hugging Face cache) or copies a local folder into a new run directory, checks that it holds
``config.json`` and ``model.safetensors`` and that the model builds from them, and only then moves it
into place. ``huggingface_hub`` is imported when a command runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from . import ShareError
from .card import RECORDS, model_card, run_records

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = 'config.json', 'model.safetensors', 'README.md'
_REPO_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}')
_LOGIN = ('log in with `hf auth login` (a token with write access, from https://huggingface.co/settings/tokens), '
          'or set the HF_TOKEN environment variable')


def check_repo_id(repo_id: str) -> str:
    """``OWNER/NAME`` as the Hub allows it (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``,
    not ending in ``.git``), else ``ShareError``."""
    text = str(repo_id)
    if not _REPO_ID.fullmatch(text) or '--' in text or '..' in text or text.endswith(('.git', '.')):
        raise ShareError(f'repository id {text!r} is not OWNER/NAME (e.g. alice/deit-pico-glyphs: letters, digits, '
                         f'-, _ and ., no -- or .., at most 96 characters each)')
    return text


def _files_of(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*')
                  if p.is_file() and not any(part.startswith('.') for part in p.relative_to(folder).parts))


def _read_run_config(run: Path, name: Optional[str] = None) -> dict:
    """The run directory's ``config.json``, checked to hold what timm's hf-hub: loader reads; ``name``:
    what to call it in a message (a pulled folder is checked in a temporary directory)."""
    shown = name or str(run)
    if not run.is_dir():
        raise ShareError(f'run directory does not exist: {run}' if not run.exists() else
                         f'{run} is a file, not a run directory')
    if not (run / CONFIG_NAME).is_file():
        raise ShareError(f'{run} is not a run directory (no {CONFIG_NAME}); push a directory written by deitlab '
                         f'train, prune or nas export')
    if not (run / WEIGHTS_NAME).is_file():
        raise ShareError(f'run directory {run} has no {WEIGHTS_NAME}')
    try:
        config = json.loads((run / CONFIG_NAME).read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShareError(f'{shown}/{CONFIG_NAME} is not valid JSON: {e}') from None
    missing = [k for k in ('architecture', 'pretrained_cfg') if not isinstance(config, dict) or not config.get(k)]
    if missing:
        hint = 'not a timm model' if name else 'save the model again with deitlab.rundir.save_run_dir'
        raise ShareError(f'{shown}/{CONFIG_NAME} lacks {" and ".join(missing)}, which the Hub layout needs ({hint})')
    return config


def _model_numbers(run: Path, name: Optional[str] = None, gmacs: bool = True) -> dict:
    """Build the run's model with its weights (the check that it loads) and count its parameters and,
    with ``gmacs``, its MACs; ``name``: what to call the directory in a message."""
    from ..bench import count_gmacs, count_params
    from ..rundir import ModelLoadError, create
    try:
        model = create(str(run)).eval()
    except ModelLoadError as e:
        if name is None:
            raise
        raise ShareError(f'{name}: {str(e).replace(str(run), name)}') from None
    macs = None
    if gmacs:
        try:
            macs = round(count_gmacs(model), 6)
        except Exception:   # noqa: BLE001 -- a model the counter cannot run: the card leaves GMACs out
            macs = None
    return dict(params=count_params(model), gmacs=macs)


def _empty_or_new(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise ShareError(f'{flag} {path} is a file, not a directory')
    if path.is_dir() and any(path.iterdir()):
        raise ShareError(f'{flag} {path} exists and is not empty; give a new or empty directory')


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    if link:
        with contextlib.suppress(OSError):   # another file system, or links not allowed: copy
            os.link(src, dst)
            return
    shutil.copyfile(src, dst)


def stage_run(run: str | Path, repo_id: str, stage: str | Path, license: Optional[str] = None,
              link: bool = False) -> dict:
    """Write the upload folder of ``run`` into ``stage`` (which must be new or empty): ``config.json``,
    ``model.safetensors``, the records present, ``README.md``. Returns the files and the card's numbers.
    ``license`` defaults to the one in the run's ``pretrained_cfg``, else apache-2.0. ``link``: hard-link
    the run's files where the file system allows (a temporary upload folder), else copy them."""
    run, stage = Path(run), Path(stage)
    config = _read_run_config(run)
    check_repo_id(repo_id)
    _empty_or_new(stage, '--stage')
    records = run_records(run)
    numbers = _model_numbers(run)
    license = license or (config.get('pretrained_cfg') or {}).get('license') or 'apache-2.0'
    stage.mkdir(parents=True, exist_ok=True)
    names = [CONFIG_NAME, WEIGHTS_NAME, *(n for n in RECORDS if n in records)]
    for name in names:
        _link_or_copy(run / name, stage / name, link)
    card = model_card(repo_id, config, records, numbers, license=license, files=names)
    (stage / CARD_NAME).write_text(card, encoding='utf-8')
    return dict(files=sorted([CARD_NAME, *names]), architecture=config['architecture'], license=license, **numbers)


def _token() -> str:
    from huggingface_hub import get_token
    token = get_token()
    if not token:
        raise ShareError(f'no Hugging Face token: {_LOGIN}')
    return token


def _hub_failure(e: Exception, repo_id: str, endpoint: Optional[str], doing: str) -> ShareError:
    """One line for what the Hub (or the network) answered."""
    where = endpoint or 'the Hugging Face Hub'
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if status == 401:
        return ShareError(f'{where} refused the token while {doing} {repo_id} (401): {_LOGIN}')
    if status == 403:
        return ShareError(f'{where} refused to let this token write to {repo_id} (403): use a token with write access '
                          f'to that namespace')
    name = type(e).__name__
    if name == 'RepositoryNotFoundError' or status == 404:
        return ShareError(f'no model repository {repo_id} on {where} (or it is private or gated and this token may '
                          f'not read it)')
    if name == 'RevisionNotFoundError':
        return ShareError(f'{repo_id} on {where} has no such revision: {first}')
    if name in ('LocalEntryNotFoundError', 'OfflineModeIsEnabled') and doing == 'fetching':
        return ShareError(f'cannot fetch {repo_id}: offline (HF_HUB_OFFLINE is set) and it is not in the Hugging Face '
                          f'cache')
    return ShareError(f'{doing} {repo_id} on {where} failed ({name}: {first})')


@contextlib.contextmanager
def _progress_bars(on: bool):
    """huggingface_hub's progress bars on or off for the duration (they are global)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    was_off = are_progress_bars_disabled()
    if not on:
        disable_progress_bars()
    try:
        yield
    finally:
        if not on and not was_off:
            enable_progress_bars()


def _is_hub_error(e: Exception) -> bool:
    module = type(e).__module__.split('.')[0]
    return module in ('huggingface_hub', 'httpx', 'httpx2', 'requests', 'urllib3') or isinstance(e, OSError)


def push_run(run: str | Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
             endpoint: Optional[str] = None, license: Optional[str] = None, stage: Optional[str | Path] = None,
             dry_run: bool = False, commit_message: Optional[str] = None, progress: bool = True) -> dict:
    """Upload run directory ``run`` to the Hub repository ``repo_id`` (created if needed, private with
    ``private``) on branch ``revision`` (default main), as one commit. With ``dry_run`` nothing is sent
    and no token is needed: the folder is written to ``stage`` (or a temporary directory) and listed.
    With ``stage`` and without ``dry_run`` the uploaded folder is kept there. ``progress``: huggingface_hub's
    progress bars."""
    run = Path(run)
    check_repo_id(repo_id)
    _read_run_config(run)
    if stage is not None:
        _empty_or_new(Path(stage), '--stage')
    token = None if dry_run else _token()   # before anything is built or sent
    if not dry_run:
        from huggingface_hub import constants
        if constants.is_offline_mode():
            raise ShareError('HF_HUB_OFFLINE is set: nothing can be uploaded; unset it, or stage the folder with '
                             '--dry-run --stage DIR')
    with tempfile.TemporaryDirectory(prefix='deitlab-push-') as tmp:
        folder = Path(stage) if stage is not None else Path(tmp) / 'upload'
        staged = stage_run(run, repo_id, folder, license=license, link=stage is None)
        sizes = {f: (folder / f).stat().st_size for f in staged['files']}
        load = f'hf-hub:{repo_id}' + (f'@{revision}' if revision and revision != 'main' else '')
        result = dict(repo_id=repo_id, revision=revision or 'main', files=staged['files'], bytes=sum(sizes.values()),
                      architecture=staged['architecture'], params=staged['params'], gmacs=staged['gmacs'],
                      license=staged['license'], private=private, load_with=load,
                      stage=str(folder) if stage is not None else None, dry_run=dry_run)
        if dry_run:
            result['card'] = (folder / CARD_NAME).read_text(encoding='utf-8')
            return result
        from huggingface_hub import HfApi
        api = HfApi(endpoint=endpoint, token=token)
        doing = 'creating'
        try:
            with _progress_bars(progress):
                url = api.create_repo(repo_id, repo_type='model', private=True if private else None, exist_ok=True)
                if revision and revision != 'main':
                    doing = 'creating the branch of'
                    api.create_branch(repo_id, branch=revision, repo_type='model', exist_ok=True)
                doing = 'uploading to'
                commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type='model',
                                           revision=revision, commit_message=commit_message or
                                           f'deitlab push: {staged["architecture"]} from run {run.name}')
        except Exception as e:   # noqa: BLE001 -- the Hub's and the network's errors become one line
            if not _is_hub_error(e):
                raise
            raise _hub_failure(e, repo_id, endpoint, doing) from None
    result.update(url=str(url), commit=getattr(commit, 'oid', None), commit_url=getattr(commit, 'commit_url', None))
    return result


def _is_local(source: str) -> bool:
    return source.startswith(('/', './', '../', '~')) or Path(source).expanduser().is_dir()


def _fetch(repo_id: str, into: Path, revision: Optional[str], endpoint: Optional[str], progress: bool) -> None:
    """``snapshot_download`` of ``repo_id`` into the directory ``into``; offline, from the cache."""
    from huggingface_hub import constants, snapshot_download
    try:
        with _progress_bars(progress):
            if constants.is_offline_mode():   # the cache's snapshot (a local_dir download would not look there)
                shutil.copytree(snapshot_download(repo_id, revision=revision, endpoint=endpoint), into,
                                dirs_exist_ok=True)
            else:
                snapshot_download(repo_id, revision=revision, endpoint=endpoint, local_dir=str(into))
    except Exception as e:   # noqa: BLE001 -- the Hub's and the network's errors become one line
        if not _is_hub_error(e):
            raise
        raise _hub_failure(e, repo_id, endpoint, 'fetching') from None
    shutil.rmtree(into / '.cache', ignore_errors=True)   # the download's bookkeeping, not part of the run


def pull_run(source: str, out: str | Path, revision: Optional[str] = None, endpoint: Optional[str] = None,
             progress: bool = True) -> dict:
    """Fetch ``source`` (``OWNER/NAME`` on the Hub, or a local folder: a path starting with ``/``, ``./``,
    ``../`` or ``~``, or an existing directory) into the new run directory ``out`` (which must not
    exist or be empty). The result is checked: ``config.json`` and ``model.safetensors`` present, the
    model built from them with its weights; nothing is left at ``out`` when a check fails. ``progress``:
    huggingface_hub's progress bars."""
    out = Path(out)
    _empty_or_new(out, '--out')
    local = _is_local(source)
    if local:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ShareError(f'folder does not exist: {source}' if not folder.exists() else
                             f'{source} is a file, not a folder to pull')
        if revision:
            raise ShareError(f'--revision names a revision on the Hub; {source} is a local folder')
    else:
        check_repo_id(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.pull-', dir=out.parent))
    try:
        if local:
            shutil.copytree(folder, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns('.git', '.cache'))
        else:
            _fetch(source, tmp, revision, endpoint, progress)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (tmp / n).is_file()]
        if missing:
            held = ', '.join(_files_of(tmp)[:8]) or 'nothing'
            raise ShareError(f'{source} is not a model in the layout timm\'s hf-hub: loader reads: no '
                             f'{" and no ".join(missing)} (it holds {held})')
        config = _read_run_config(tmp, source)
        numbers = _model_numbers(tmp, source, gmacs=False)   # builds the model with its weights: it loads
        files = _files_of(tmp)
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(run_dir=str(out), source=source, local=local, revision=None if local else (revision or 'main'),
                files=files, architecture=config['architecture'], num_classes=config.get('num_classes'),
                params=numbers['params'], load_with=f'local-dir:{out}')
