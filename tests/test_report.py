"""deitlab report: the Pareto front exactly, the records of run directories and of the committed
benchmark results, the page's content, the command, and the page in a real headless browser (Debian's
chromium through its chromedriver; skipped when they are not installed)."""
import json
import random
import re
import shutil
import statistics
from pathlib import Path

import pytest

from deitlab.report.adapters import read_benchmark_json
from deitlab.report.records import ModelRecord, ReportError, front_of, pareto_front, unique_names

RESULTS = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
PICO = 'deitlab_deit_pico_patch4_32'
plotly = pytest.importorskip('plotly', reason="the report extra is not installed (pip install -e '.[report]')")


# ------------------------------------------------------------------------------------------ Pareto front

def _dominated(points, i):
    c, a = points[i]
    return any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in points)


def test_pareto_front_of_a_hand_made_set():
    points = [(1, 70), (2, 80), (2, 75), (3, 80), (4, 90), (0.5, 60), (4, 90), (5, 85), (0.5, 55)]
    # (2, 75) and (3, 80) lose to (2, 80); (5, 85) to (4, 90); (0.5, 55) to (0.5, 60); the two (4, 90) tie
    assert pareto_front(points) == [5, 0, 1, 4, 6]
    assert pareto_front([]) == [] and pareto_front([(1.0, 50.0)]) == [0]


def test_pareto_front_is_the_set_of_undominated_points():
    rng = random.Random(0)
    for n in (2, 5, 30, 200):
        points = [(rng.choice([1, 2, 3, 4, 5, 6]) * 0.01, rng.choice(range(70, 80))) for _ in range(n)]
        front = pareto_front(points)
        assert set(front) == {i for i in range(n) if not _dominated(points, i)}
        costs = [points[i][0] for i in front]
        accs = [points[i][1] for i in front]
        assert costs == sorted(costs) and accs == sorted(accs)   # a staircase: dearer is better


def test_front_per_dataset_and_records_without_numbers_left_out():
    rs = [ModelRecord('a', 's', 'k', data='x', top1=80, gmacs=1.0), ModelRecord('b', 's', 'k', data='x', top1=70,
                                                                                 gmacs=2.0),
          ModelRecord('c', 's', 'k', data='y', top1=60, gmacs=3.0), ModelRecord('d', 's', 'k', data='x', top1=None,
                                                                                 gmacs=0.1),
          ModelRecord('e', 's', 'k', data='x', top1=90, gmacs=None, latency_ms=1.0),
          ModelRecord('f', 's', 'k', data='x', top1=85, gmacs=float('nan'), latency_ms=2.0)]
    assert front_of(rs, 'gmacs') == {'x': [0], 'y': [2]}   # b is dominated by a; c is alone on its dataset
    assert front_of(rs, 'latency_ms') == {'x': [4]}


def test_unique_names():
    rs = [ModelRecord('dense', 'nvit', 'prune'), ModelRecord('dense', 'ofb', 'prune'), ModelRecord('x', 'a', 'k'),
          ModelRecord('y', 'a', 'k'), ModelRecord('y', 'a', 'k')]
    unique_names(rs)
    assert [r.name for r in rs] == ['nvit: dense', 'ofb: dense', 'x', 'a: y', 'a: y (2)']


# ------------------------------------------------------------------------------------ benchmark results

def test_prune_results_one_record_per_arm_and_budget():
    raw = json.loads((RESULTS / 'nvit_fmnist.json').read_text())
    rs = read_benchmark_json(RESULTS / 'nvit_fmnist.json')
    assert len(rs) == len(raw['rows']) and len({r.name for r in rs}) == len(rs)
    dense = rs[0]
    assert (dense.name, dense.top1, dense.gmacs, dense.params, dense.latency_ms) == ('dense', 89.12, 0.036133824,
                                                                                    678730, None)
    row = next(r for r in raw['rows'] if r['arm'] == 'nvit' and r['budget'] == 0.5)
    rec = next(r for r in rs if r.name == 'nvit latency 0.5')
    assert (rec.top1, rec.gmacs, rec.data) == (row['top1'], row['gmacs'], 'fashion-mnist')
    assert rec.latency_ms == statistics.median(s['latency_ms'] for s in row['seeds'])
    assert rec.widths == row['widths'] and rec.dense_widths == raw['rows'][0]['widths']
    assert rec.machine['threads'] == 2 and rec.machine is dense.machine
    ofb = read_benchmark_json(RESULTS / 'ofb_fmnist.json')
    assert [r.name for r in ofb if r.name.startswith('ofb ')] == ['ofb gmacs 0.7', 'ofb gmacs 0.5', 'ofb gmacs 0.35']
    ablation = read_benchmark_json(RESULTS / 'nvit_fmnist_ablation.json')   # one seed per row: its own latency
    raw = json.loads((RESULTS / 'nvit_fmnist_ablation.json').read_text())
    assert [r.latency_ms for r in ablation] == [r.get('latency_ms') for r in raw['rows']]


def test_tokens_mixers_reference_demo_and_export_results():
    raw = json.loads((RESULTS / 'tokens_fmnist.json').read_text())
    rs = read_benchmark_json(RESULTS / 'tokens_fmnist.json')
    assert len(rs) == len(raw['rows']) == len({r.name for r in rs})
    assert [(r.top1, r.gmacs, r.latency_ms) for r in rs] == [(r['top1'], r['gmacs'], r['latency_ms'])
                                                              for r in raw['rows']]
    assert rs[0].name == 'nano/baseline (off-the-shelf)'
    assert rs[0].machine['device_name'] == 'Intel(R) Xeon(R) Processor'
    mixers = read_benchmark_json(RESULTS / 'mixers.json')
    assert {r.data for r in mixers} == {'fashion-mnist', 'glyphs'} and len(mixers) == 14
    assert next(r for r in mixers if r.name == 'PoolFormer / glyphs').params == 692728
    (ref,) = read_benchmark_json(RESULTS / 'reference_fmnist.json')
    assert (ref.top1, ref.gmacs, ref.params, round(ref.latency_ms, 4)) == (89.12, 0.036133824, 678730, 2.8262)
    assert [row['epoch'] for row in ref.curve] == list(range(1, 10)) and ref.machine['device_name'] == 'AMD EPYC'
    demo = read_benchmark_json(RESULTS / 'demo.json')
    assert demo[0].top1 == 94.04 and demo[0].data.startswith('glyphs')
    export = read_benchmark_json(RESULTS / 'export.json')   # no accuracy: in the table, not on the charts
    assert len(export) == 10 and not any(r.has('gmacs') or r.has('latency_ms') for r in export)
    assert export[0].latency_ms == json.loads((RESULTS / 'export.json').read_text())['rows'][0]['speed']['batch_1'][
        'pytorch_ms']


def test_unknown_result_files_are_refused_with_the_kinds_named(tmp_path):
    with pytest.raises(ReportError, match=r"latency_check.json is not a benchmark result this report reads "
                                          r"\(\"benchmark\": 'latency_check'\); the kinds it reads: prune "
                                          r"\(nvit_fmnist.json.*export \(export.json\)"):
        read_benchmark_json(RESULTS / 'latency_check.json')
    (tmp_path / 'list.json').write_text('[1, 2]')
    with pytest.raises(ReportError, match=r'list.json is not a benchmark result this report reads \(a JSON list\)'):
        read_benchmark_json(tmp_path / 'list.json')
    (tmp_path / 'cut.json').write_text('{"rows": [')
    with pytest.raises(ReportError, match=r'cut.json is not JSON \(Expecting value: line 1, column 11\)'):
        read_benchmark_json(tmp_path / 'cut.json')


# ------------------------------------------------------------------------------------- run directories

def _run_dir(path: Path, widths=None, epochs=3, summary=True, seed=0):
    """A pico DeiT (two blocks, pruned-looking widths unless ``widths`` is False: then the uniform ones) saved as a run
    directory with a metrics.jsonl of ``epochs`` epochs, train_config.json and summary.json."""
    import timm
    import torch
    from deitlab.rundir import save_run_dir
    torch.manual_seed(seed)
    kw = dict(num_heads=[2, 1], qk_dim=[32, 16], v_dim=[32, 8], mlp_hidden=[256, 40]) if widths is None else {}
    save_run_dir(timm.create_model(PICO, depth=2, num_classes=3, **kw), path, label_names=['a', 'b', 'c'])
    rows = [dict(epoch=e, step=10 * e, train_loss=2.0 - 0.3 * e, val_top1=40.0 + 10 * e + seed, val_top5=100.0)
            for e in range(1, epochs + 1)]
    (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"epoch": 9, "cut')
    (path / 'train_config.json').write_text(json.dumps(dict(model=PICO, data='glyphs:train=64', epochs=epochs)))
    if summary:
        (path / 'summary.json').write_text(json.dumps(dict(val_top1=rows[-1]['val_top1'] + 0.5, data='glyphs:train=64',
                                                           epochs=epochs)))
    return path


def test_run_directory_record(tmp_path):
    from deitlab.report.runs import measure_runs, read_run_dir
    from deitlab.bench import analytic_gmacs, count_params
    from deitlab.rundir import create
    run = _run_dir(tmp_path / 'pruned')
    r = read_run_dir(run)
    assert (r.name, r.source, r.kind, r.data, r.top1) == ('pruned', str(run), 'run', 'glyphs:train=64', 70.5)
    assert [row['epoch'] for row in r.curve] == [1, 2, 3]   # the line cut short is skipped
    assert r.widths == dict(num_heads=[2, 1], qk_dim=[32, 16], v_dim=[32, 8], mlp_hidden=[256, 40], embed_dim=64)
    assert r.config['config.json']['label_names'] == '3 names' and r.config['train_config.json']['epochs'] == 3
    assert r.gmacs is None and r.latency_ms is None
    model = create(str(run))
    machine = measure_runs([r], [run])
    assert r.gmacs == pytest.approx(analytic_gmacs(model), rel=1e-9) and r.params == count_params(model)
    assert r.latency_ms is None and 'not measured' in machine['latency'] and r.machine is machine
    # no summary.json: top-1 of the last epoch of metrics.jsonl that has one
    bare = read_run_dir(_run_dir(tmp_path / 'bare', widths=False, summary=False))
    assert bare.top1 == 70.0 and bare.data == 'glyphs:train=64'
    assert bare.widths == dict(num_heads=[2, 2], qk_dim=[32, 32], v_dim=[32, 32], mlp_hidden=[256, 256], embed_dim=64)


def test_measured_latency_of_run_directories(tmp_path):
    from deitlab.report.runs import measure_runs, read_run_dir
    runs = [_run_dir(tmp_path / n, seed=i) for i, n in enumerate(('a', 'b'))]
    rs = [read_run_dir(p) for p in runs]
    machine = measure_runs(rs, runs, measure=True, device='cpu', quick=True, progress=False)
    assert all(r.latency_ms > 0 for r in rs) and machine['device'] == 'cpu' and machine['rounds'] == 3
    assert 'interleaved' in machine['latency'] and 'interleaved' in rs[0].notes


def test_a_directory_of_runs_and_a_pruning_report(tmp_path):
    from deitlab.report import collect_records
    root = tmp_path / 'runs'
    _run_dir(root / 'b')
    _run_dir(root / 'a')
    (root / 'notes').mkdir()   # not a run directory: skipped
    (root / 'b' / 'report.json').write_text(json.dumps(dict(
        target=dict(kind='latency', value=0.5), dense_widths=dict(num_heads=[2, 2], mlp_hidden=[256, 256]))))
    records, paths = collect_records([root, RESULTS / 'reference_fmnist.json', root / 'a'])   # a only once
    assert [r.name for r in records] == ['a', 'b', 'deitlab_deit_nano_patch4_32 (reference run)']
    assert paths == [root / 'a', root / 'b']
    assert records[1].dense_widths == dict(num_heads=[2, 2], mlp_hidden=[256, 256])
    assert records[1].config['pruning']['target'] == dict(kind='latency', value=0.5)


# ------------------------------------------------------------------------------------------- the page

@pytest.fixture(scope='module')
def page(tmp_path_factory):
    """A report over two run directories and two committed result files: (html path, summary, records)."""
    from deitlab.report import collect_records, measure_runs, write_report
    root = tmp_path_factory.mktemp('report')
    sources = [_run_dir(root / 'runs' / 'pico-a'), _run_dir(root / 'runs' / 'pico-b', widths=False, seed=1),
               RESULTS / 'reference_fmnist.json', RESULTS / 'mixers.json', RESULTS / 'export.json']
    summary = write_report(sources, root / 'report.html', title='Test <report>')
    records, runs = collect_records(sources)
    measure_runs([r for r in records if r.kind == 'run'], runs)   # GMACs, as write_report counted them
    return root / 'report.html', summary, records


def test_the_page_is_one_self_contained_file(page):
    path, summary, records = page
    text = path.read_text(encoding='utf-8')
    assert summary['out'] == str(path) and summary['models'] == len(records) == 2 + 1 + 14 + 10
    assert summary['charted'] == dict(gmacs=17, latency=15) and summary['bytes'] == len(text.encode())
    assert not re.search(r'<script[^>]+src=|<link\b|<iframe|<img\b', text)   # nothing to fetch
    assert text.count('<script type="text/javascript">') == 1 and 'Plotly.newPlot' in text
    assert '<title>Test &lt;report&gt;</title>' in text
    body = re.search(r'<table id="models".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    names = re.findall(r'<tr><td data-value="([^"]*)">', body)
    assert names == [r.name for r in records]
    assert all(f'<details class="model" id="model-{i}">' in text for i in range(len(records)))
    assert text.count('data-figure="fig-') == 2 + 2 + 1   # widths and curves of the two runs, the reference's curve
    assert 'AMD EPYC' in text and 'Intel(R) Xeon(R) Processor' in text   # the machines of mixers and export
    assert summary['pareto']['gmacs']['glyphs'] == ['PoolFormer / glyphs', 'SpectFormer-H / glyphs']


def test_the_command(tmp_path, capsys):
    from deitlab.cli import main
    run = _run_dir(tmp_path / 'run')
    out = tmp_path / 'r.html'
    assert main(['report', str(run), str(RESULTS / 'reference_fmnist.json'), '--out', str(out), '--json']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['models'] == 2 and result['out'] == str(out) and out.is_file() and not result['measured']
    assert main(['report', str(run), '--out', str(out), '--title', 'one']) == 0
    printed = capsys.readouterr().out
    assert 'models: 1 from 1 source(s); 1 drawn against GMACs, 0 against latency' in printed
    assert f'open: {out.resolve().as_uri()}' in printed
    assert main(['report', str(run), '--out', str(out), '--measure', '--quick', '--device', 'cpu', '--json']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['measured'] and result['charted'] == dict(gmacs=1, latency=1)
    assert result['pareto']['latency'] == {'glyphs:train=64': ['run']}


def test_without_plotly_the_error_says_what_to_install(tmp_path, monkeypatch):
    import sys
    from deitlab.report import write_report
    monkeypatch.setitem(sys.modules, 'plotly', None)   # as if it were not installed
    with pytest.raises(ReportError, match=r"plotly, which is not installed: pip install 'deitlab\[report\]'"):
        write_report([RESULTS / 'reference_fmnist.json'], tmp_path / 'r.html')
    assert not (tmp_path / 'r.html').exists()


def test_no_sources_is_a_clear_error(tmp_path):
    from deitlab.report import write_report
    with pytest.raises(ReportError, match=r'^no runs to report on: give run directories \(or directories holding '
                                          r'them\) or benchmark result files'):
        write_report([], tmp_path / 'r.html')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ReportError, match=r'empty holds no run directory'):
        write_report([tmp_path / 'empty'], tmp_path / 'r.html')
    assert not (tmp_path / 'r.html').exists()


# --------------------------------------------------------------------------------- in a real browser

CHROMIUM, CHROMEDRIVER = shutil.which('chromium'), shutil.which('chromedriver')


@pytest.fixture(scope='module')
def browser():
    webdriver = pytest.importorskip('selenium.webdriver', reason='selenium is not installed')
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                '--window-size=1280,1600'):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)   # the system's driver: no download
    yield driver
    driver.quit()


def _severe(driver):
    return [e for e in driver.get_log('browser') if e['level'] == 'SEVERE']


def _column(driver, col):
    return driver.execute_script(
        'return Array.from(document.querySelectorAll("#models tbody tr"))'
        '.map(r => r.cells[arguments[0]].dataset.value)', col)


def test_the_page_in_a_browser(page, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    path, summary, records = page
    browser.get(path.as_uri())
    assert _severe(browser) == []
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0   # no fetches
    buttons = browser.execute_script("return Array.from(document.querySelectorAll('#chart-gmacs .modebar-btn'))"
                                     ".map(b => b.getAttribute('data-title'))")
    assert 'Download plot as a PNG' in buttons and not [b for b in buttons if 'Share' in b]   # nothing uploads
    # one marker per model on each chart; the front traces hold exactly the front
    for element, attr in (('chart-gmacs', 'gmacs'), ('chart-latency', 'latency_ms')):
        traces = browser.execute_script(
            'return document.getElementById(arguments[0]).data.map(t => [t.meta, Array.from(t.customdata)])', element)
        shown = [i for meta, idx in traces if meta == 'models' for i in idx]
        assert sorted(shown) == [i for i, r in enumerate(records) if r.has(attr)]
        assert len(shown) == summary['charted']['gmacs' if attr == 'gmacs' else 'latency']
        fronts = [idx for meta, idx in traces if meta == 'pareto']
        assert fronts == list(front_of(records, attr).values())
    # sorting: the top-1 header sorts ascending, then descending; blanks (the export rows) stay last
    headers = browser.find_elements(By.CSS_SELECTOR, '#models thead th')
    top1 = [h.text for h in headers].index('top-1 (%)')
    before = _column(browser, 0)
    headers[top1].click()
    values = _column(browser, top1)
    numbers = sorted(r.top1 for r in records if r.top1 is not None)
    assert [float(v) for v in values[:len(numbers)]] == numbers and set(values[len(numbers):]) == {''}
    assert headers[top1].get_attribute('aria-sort') == 'ascending' and _column(browser, 0) != before
    headers[top1].click()
    values = _column(browser, top1)
    assert [float(v) for v in values[:len(numbers)]] == numbers[::-1] and headers[top1].get_attribute(
        'aria-sort') == 'descending'
    lowest = min((r for r in records if r.top1 is not None), key=lambda r: r.top1).name
    assert _column(browser, 0)[len(numbers) - 1] == lowest
    gm = [h.text for h in headers].index('GMACs')
    headers[gm].click()
    values = [float(v) for v in _column(browser, gm) if v]
    assert values == sorted(values) and len(values) == 17
    # clicking a marker opens that model's details, and its widths chart is drawn then
    point = browser.find_elements(By.CSS_SELECTOR, '#chart-gmacs .scatterlayer .trace .point')[0]
    i = browser.execute_script('return document.getElementById("chart-gmacs").data[0].customdata[0]')
    assert records[i].widths and records[i].name == 'pico-a'
    ActionChains(browser).move_to_element(point).pause(0.2).click().perform()
    opened = 'return Array.from(document.querySelectorAll("details.model[open]")).map(d => d.id)'
    assert WebDriverWait(browser, 10).until(lambda b: b.execute_script(opened)) == [f'model-{i}']
    drawn = 'const g = document.querySelector(arguments[0] + " div[data-figure]"); ' \
            'return g.classList.contains("js-plotly-plot") ? g.data.length : null'
    bars = WebDriverWait(browser, 20).until(lambda b: b.execute_script(drawn, f'#model-{i}'))
    assert bars == 4   # heads, QK, V, MLP panels of the model (no dense widths recorded)
    assert _severe(browser) == []
