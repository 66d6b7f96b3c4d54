"""A Hugging Face Hub on 127.0.0.1 for the tests, in memory: the few routes that ``HfApi.create_repo``,
``create_branch``, ``upload_folder`` (regular uploads: file contents inline in the commit) and
``snapshot_download`` use. Not the Hub: no LFS, no Xet, no pagination, one repository type. Every
request's method and path is kept in ``requests`` and its token in ``tokens``."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r'(?P<repo>[^/]+/[^/]+)'


class LocalHub:
    def __init__(self):
        self.repos = {}      # repo id -> {'private': bool, 'refs': {branch: commit}}
        self.commits = {}    # commit id -> {path: bytes}
        self.requests, self.tokens, self.cards = [], [], []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # quiet
                pass

            def do_GET(self):
                hub._route(self, 'GET')

            def do_HEAD(self):
                hub._route(self, 'HEAD')

            def do_POST(self):
                hub._route(self, 'POST')

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # --- the routes ---

    def _route(self, h, method):
        path = unquote(urlsplit(h.path).path)
        self.requests.append((method, path))
        self.tokens.append(h.headers.get('authorization'))
        body = h.rfile.read(int(h.headers.get('content-length') or 0)) if method == 'POST' else b''
        routes = [('POST', r'/api/repos/create', self._create), ('POST', r'/api/validate-yaml', self._validate_yaml),
                  ('POST', rf'/api/models/{_REPO}/branch/(?P<branch>.+)', self._branch),
                  ('POST', rf'/api/models/{_REPO}/preupload/(?P<rev>.+)', self._preupload),
                  ('POST', rf'/api/models/{_REPO}/commit/(?P<rev>.+)', self._commit),
                  ('GET', rf'/api/models/{_REPO}/revision/(?P<rev>.+)', self._info),
                  ('GET', rf'/api/models/{_REPO}/tree/(?P<rev>[^/]+)(/.*)?', self._tree),
                  ('GET', rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self._file),
                  ('HEAD', rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self._file)]
        for m, pattern, handle in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return handle(h, method, body, **match.groupdict())
        self._send(h, 404, {'error': f'no route {method} {path}'})

    def _send(self, h, status, payload=None, headers=None, raw=None, head=False):
        data = raw if raw is not None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header('Content-Type', 'application/octet-stream' if raw is not None else 'application/json')
        h.send_header('Content-Length', str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if status >= 400:
            h.send_header('X-Error-Code', 'RepoNotFound' if status == 404 else 'Error')
            h.send_header('X-Error-Message', (payload or {}).get('error', ''))
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def _files(self, repo, rev):
        refs = self.repos.get(repo, {}).get('refs', {})
        commit = refs.get(rev, rev if rev in self.commits else None)
        return commit, self.commits.get(commit)

    def _create(self, h, method, body):
        req = json.loads(body)
        repo = f'{req["organization"]}/{req["name"]}' if req.get('organization') else req['name']
        if repo in self.repos:
            return self._send(h, 409, {'error': 'You already created this model repo', 'url': f'{self.url}/{repo}'})
        self.repos[repo] = {'private': bool(req.get('private')), 'refs': {}}
        self._send(h, 200, {'url': f'{self.url}/{repo}', 'name': repo})

    def _validate_yaml(self, h, method, body):
        """The card's front matter: a YAML mapping with a license (the Hub checks much more)."""
        import yaml
        content = json.loads(body)['content']
        errors = []
        if not content.startswith('---\n'):
            errors.append('no YAML front matter')
        else:
            meta = yaml.safe_load(content.split('---\n')[1])
            if not isinstance(meta, dict) or not isinstance(meta.get('license'), str):
                errors.append('the front matter is not a mapping with a license')
        self.cards.append(content)
        self._send(h, 400 if errors else 200, {'errors': [{'message': e} for e in errors], 'warnings': []})

    def _branch(self, h, method, body, repo, branch):
        refs = self.repos[repo]['refs']
        if branch not in refs:
            refs[branch] = refs.get('main') or self._new_commit({})
        self._send(h, 200, {})

    def _preupload(self, h, method, body, repo, rev):
        files = json.loads(body)['files']
        self._send(h, 200, {'files': [dict(path=f['path'], uploadMode='regular', shouldIgnore=False) for f in files]})

    def _new_commit(self, files):
        commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
                              + str(len(self.commits)).encode()).hexdigest()
        self.commits[commit] = files
        return commit

    def _commit(self, h, method, body, repo, rev):
        if repo not in self.repos:
            return self._send(h, 404, {'error': 'Repository not found'})
        refs = self.repos[repo]['refs']
        files = dict(self.commits.get(refs.get(rev), {}))
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item['key'] == 'file':
                files[item['value']['path']] = base64.b64decode(item['value']['content'])
        refs[rev] = commit = self._new_commit(files)
        self._send(h, 200, {'commitUrl': f'{self.url}/{repo}/commit/{commit}', 'commitOid': commit,
                            'commitMessage': 'ok', 'pullRequestUrl': None})

    def _info(self, h, method, body, repo, rev):
        commit, files = self._files(repo, rev)
        if files is None:
            return self._send(h, 404, {'error': 'Repository not found'})
        self._send(h, 200, {'id': repo, 'modelId': repo, 'sha': commit, 'private': self.repos[repo]['private'],
                            'siblings': [{'rfilename': p} for p in sorted(files)]})

    def _tree(self, h, method, body, repo, rev, **_):
        commit, files = self._files(repo, rev)
        if files is None:
            return self._send(h, 404, {'error': 'Repository not found'})
        self._send(h, 200, [dict(type='file', path=p, size=len(v), oid=hashlib.sha1(v).hexdigest())
                            for p, v in sorted(files.items())])

    def _file(self, h, method, body, repo, rev, file):
        commit, files = self._files(repo, rev)
        if files is None or file not in files:
            return self._send(h, 404, {'error': 'Entry not found'})
        data = files[file]
        self._send(h, 200, raw=data, head=method == 'HEAD',
                   headers={'X-Repo-Commit': commit, 'ETag': f'"{hashlib.sha1(data).hexdigest()}"'})
