"""README tables of the methods' benchmarks: multi-level training, DCAL, ViT-ResNAS and the papyri detectors."""
from __future__ import annotations

from _tables_base import load, source, table


def _pct(x: float) -> str:
    return f'{100 * x:+.0f}%'


def _ms(d: dict, nd: int = 2) -> str:
    """``mean ± std`` (the mean alone for one seed)."""
    if d.get('mean') is None:
        return ''
    return f"{d['mean']:.{nd}f}" + (f" ± {d['std']:.{nd}f}" if d.get('std') is not None else '')


def t_multilevel() -> str:
    res = load('multilevel_fmnist')
    s = res['summary']
    plain = s['plain']
    rows = []
    for arm, a in s.items():
        minutes = {k: (v / 60 if v is not None else None) for k, v in a['wall_s'].items() if k in ('mean', 'std')}
        rows.append([arm + (' (seed 0)' if a['top1']['n'] == 1 else ''), _ms(a['top1']),
                     f"{a['top1']['mean'] - plain['top1']['mean']:+.2f}",
                     f"{a['gflops']['mean'] / 1e3:.1f}", _pct(-a['gflops_saving']) if arm != 'plain' else '',
                     _ms(minutes, 1),
                     _pct(-a['wall_saving']) if arm != 'plain' else '', f"{a['reached']}/{a['top1']['n']}",
                     _ms(a['plain_top1_same_gflops']) if arm != 'plain' else ''])
    n = plain['top1']['n']
    bar = []
    for arm, a in s.items():
        if arm not in res.get('main_arms', ('2-level', '3-level')) or arm == 'plain':
            continue
        gap = a['top1']['mean'] - plain['top1']['mean']
        checks = [('training FLOPs', a['gflops_saving'] >= 0.25, f"{100 * a['gflops_saving']:.0f}% fewer (bar 25%)"),
                  ('wall time', a['wall_saving'] >= 0.15, f"{100 * a['wall_saving']:.0f}% less (bar 15%)"),
                  ('top-1', abs(gap) <= 0.5 or gap > 0, f'{gap:+.2f} pt (bar: within 0.5 pt)')]
        bar.append(f'{arm}: ' + '; '.join(f"{what} {text}, {'met' if ok else 'missed'}" for what, ok, text in checks))
    return '\n'.join([
        table(['schedule', 'top-1 (%)', 'vs plain', 'training TFLOPs', 'FLOPs vs plain', 'training time (min)',
               'time vs plain', 'runs reaching plain top-1', 'plain top-1 at the same FLOPs'], rows),
        '',
        'Against the bar: ' + '. '.join(bar) + '.',
        '',
        f"{res['model']} on Fashion-MNIST, {res['epochs']} epochs of {res['steps_per_epoch']} steps (batch "
        f"{res['batch_size']}), mean ± std over {n} seeds; training FLOPs count forward and backward, the time "
        f"leaves evaluation out (1 thread per run, two runs at a time). 'Runs reaching plain top-1' counts the runs "
        f"whose test top-1 reached the plain runs' mean final top-1 ({res['target_top1']:.2f}%) at some evaluation; "
        f"'plain top-1 at the same FLOPs' is the plain runs' test top-1 after as many training FLOPs (their "
        f"evaluations interpolated).",
        source(['multilevel_fmnist'], 'python benchmarks/multilevel_fmnist.py train --jobs 2 && '
                                      'python benchmarks/multilevel_fmnist.py report')])


def t_dcal() -> str:
    res = load('dcal')
    s = res['summary']
    rows = []
    for arm in res['arms']:
        fine, fm, reid = s['fine'].get(arm), s['fmnist'].get(arm), s['reid'].get(arm)
        rows.append([arm, _ms(fine['top1']), _ms(fm['top1']), _ms(fm['garment_confusions'], 0),
                     _ms(reid['mAP']), _ms(reid['rank1']), f"{fine['gflops_ratio']['mean']:.2f}",
                     f"{fine['time_ratio']['mean']:.2f}"])
    verdict = []
    for task, v in res['verdict'].items():
        word = 'beats' if v['beats'] else 'does not beat'
        verdict.append(f"{task}: DCAL {word} the baseline ({v['metric']} {v['gap']:+.2f}, seed spread "
                       f"{v['spread']:.2f})")
    return '\n'.join([
        table(['arm', 'glyphs-fine top-1', 'FMNIST top-1', 'FMNIST garment confusions', 'glyphs-reid mAP',
               'glyphs-reid Rank-1', 'training FLOPs (x baseline)', 'training time (x baseline)'], rows,
              bold=(1, 2, 4, 5), lower=(3,)),
        '',
        f"{res['model']}, the same recipe and steps for every arm, mean ± std over {len(res['seeds'])} seeds. "
        f"Garment confusions: Fashion-MNIST test images of T-shirt, pullover, coat or shirt predicted as another "
        f"of the four. Cost ratios on glyphs-fine. " + '; '.join(verdict) + '.',
        source(['dcal'], 'python benchmarks/dcal.py train --jobs 2 && python benchmarks/dcal.py report')])


def t_dcal_reid_features() -> str:
    """DCAL's re-ID feature taken apart: each half alone, against the backbone trained alone."""
    res, dcal = load('dcal_reid_features'), load('dcal')
    base = dcal['summary']['reid']['baseline']
    names = {'sa': 'SA feature (the backbone\'s)', 'glca': 'GLCA feature', 'sa+glca': 'both joined (eval --retrieval)'}
    rows = [['baseline (trained alone)', 'its feature', _ms(base['mAP']), _ms(base['rank1'])]]
    for arm, parts in res['summary'].items():
        rows += [[arm, names[part], _ms(m['mAP']), _ms(m['rank1'])] for part, m in parts.items()]
    sa = res['summary']['glca']['sa']['mAP']
    spread = max(sa['std'] or 0, base['mAP']['std'] or 0)
    base_runs = {r['seed']: r['mAP'] for r in dcal['runs'] if r['task'] == 'reid' and r['arm'] == 'baseline'}
    rerun = max(abs(parts['sa+glca']['mAP']['mean'] - dcal['summary']['reid'][arm]['mAP']['mean'])
                for arm, parts in res['summary'].items())
    paired = ', '.join(f"{r['sa']['mAP'] - base_runs[r['seed']]:+.1f}" for r in res['runs']
                       if r['arm'] == 'glca' and r['seed'] in base_runs)
    return '\n'.join([
        table(['model', 'retrieval feature', 'glyphs-reid mAP', 'glyphs-reid Rank-1'], rows, bold=(2, 3)),
        '',
        f"{res['model']} on {res['data']}, mean ± std over {len(res['seeds'])} seeds; the baseline row is the "
        f"benchmark's above (same recipe, seeds and triplet loss); the dcal and glca runs were trained again for "
        f"this, their joined features within {rerun:.2f} mAP of the table above. The backbone's own feature after "
        f"training with "
        f"GLCA: mAP {sa['mean'] - base['mAP']['mean']:+.2f} vs the backbone trained alone (seed spread {spread:.2f}; "
        f"seed by seed {paired}).",
        source(['dcal_reid_features', 'dcal'], 'python benchmarks/dcal.py features')])


_RESNAS_BAR = {
    'macs_beats_baseline': "the network searched at DeiT-nano's MACs beats it",
    'tau_above_0_3': 'Kendall tau > 0.3 on the held-out images',
    'tau_above_0_3_test': 'on the test images',
    'evolution_beats_random': 'evolution beats the best random network on the held-out images',
    'evolution_beats_random_test': 'on the test images',
    'latency_model_faster_and_better': "the network searched at DeiT-nano's latency is as fast and beats it",
    'latency_predictions_within_15pct': 'every latency prediction within 15%'}


def _resnas_verdict(res: dict) -> list:
    """What the searched networks buy over DeiT-nano, and how much of it the space alone gives."""
    t = res['trained']
    base = t['deit_nano']
    out = []
    for arm, what in (('macs', "DeiT-nano's MACs"), ('latency', "DeiT-nano's latency")):
        gap = t[arm]['top1']['mean'] - base['top1']['mean']
        spread = max(t[arm]['top1']['std'] or 0, base['top1']['std'] or 0)
        out.append(f"- Searched at {what}: {gap:+.2f} pt top-1 vs DeiT-nano (seed spread {spread:.2f}) at "
                   f"{t[arm]['macs'] / base['macs']:.2f}x its MACs and {t[arm]['measured_ms'] / base['measured_ms']:.2f}x "
                   f"its measured latency.")
    done = [s for s in res['standalone'] if s['top1'] is not None]
    small = min(done, key=lambda s: s['macs'])
    tops = [s['top1'] for s in done]
    out.append(f"- The {len(done)} stand-alone networks drawn from the space at random, {min(s['macs'] for s in done) / 1e6:.1f}"
               f"-{max(s['macs'] for s in done) / 1e6:.1f}M MACs, reach {min(tops):.2f}-{max(tops):.2f} top-1; the "
               f"smallest, at {small['macs'] / base['macs']:.2f}x DeiT-nano's MACs, "
               f"{small['top1'] - base['top1']['mean']:+.2f} pt vs it.")
    return out


def t_resnas() -> str:
    res = load('resnas_fmnist')
    names = {'deit_nano': 'DeiT-nano', 'macs': 'searched at DeiT-nano MACs', 'latency': 'searched at DeiT-nano latency'}
    rows = []
    for arm, t in res['trained'].items():
        pred = '' if t.get('predicted_ms') is None else f"{t['predicted_ms']:.2f}"
        rows.append([names.get(arm, arm), _ms(t['top1']), f"{t['macs'] / 1e6:.1f}",
                     f"{t['params'] / 1e6:.2f}" if t.get('params') else '', f"{t['measured_ms']:.2f}", pred])
    s, tau, lat, bar = res['search'], res['kendall_tau'], res['latency_check'], res['bar']
    sn, images, ev = res['supernet']['cost'], res['fitness_images'], res['search']['macs']
    tref = res['latency_table_meta']['reference_ms']
    lines = [
        table(['network', 'top-1 (%)', 'MACs (M)', 'params (M)', 'measured ms', 'predicted ms'], rows,
              bold=(1,), lower=(4,)),
        '',
        f"Fashion-MNIST at {res['img_size']} px, every network trained from scratch with the same recipe "
        f"({res['train_recipe']}), mean ± std over {len(res['seeds'])} seeds; latency at batch 1 on 1 thread of "
        f"this CPU, measured in one paired run. Supernet: {sn['cpu_min']:.0f} CPU-minutes; searches: "
        f"{ev['cpu_min']:.0f} (MACs, {ev['evaluated']} networks) and {s['latency']['cpu_min']:.0f} "
        f"(latency) CPU-minutes. Evolution's best vs the best of {ev['random_evaluated']} random networks in the "
        f"same MACs window: {ev['best']['fitness']:.2f} vs {ev['random_best']['fitness']:.2f} supernet top-1 on the "
        f"{images['held_out']:,} held-out images the search ranks by, {ev['best_fitness_test']:.2f} vs "
        f"{ev['random_best_test']['fitness_test']:.2f} on the {images['test']:,} test images. Supernet ranking of "
        f"{tau['n']} stand-alone networks (their top-1 the mean over {len(res['seeds'])} seeds): Kendall tau "
        f"{tau['tau']:.2f} against the held-out fitness, {res['kendall_tau_test']['tau']:.2f} against the fitness "
        f"on the test images. Latency table (timed with the reference block at {tref:.2f} ms): largest error "
        f"{100 * lat['max_abs_rel_error']:.1f}% over {len(lat['rows'])} networks in the run above (reference block "
        f"{lat['settings']['reference_ms']:.2f} ms; rank correlation {lat['spearman']:.2f})" + ''.join(
            f", {100 * c['max_abs_rel_error']:.1f}% in an earlier run (reference block {c['settings']['reference_ms']:.2f} ms; "
            f"rank correlation {c['spearman']:.2f})"
            for c in res['latency_check_earlier']) + '.',
        '',
        *_resnas_verdict(res),
        '',
        'Bar: ' + '; '.join(f"{_RESNAS_BAR.get(k, k)}: {'yes' if v else 'no'}" for k, v in bar.items()) + '.',
        source(['resnas_fmnist'], 'DEITLAB_BENCH_RUNS=DIR python benchmarks/resnas_fmnist.py all --jobs 2')]
    return '\n'.join(lines)


def t_multilevel_stages() -> str:
    """What each stage of the V-cycles costs and gives: means over the seeds of the main arms."""
    res = load('multilevel_fmnist')
    rows = []
    for arm in res.get('main_arms', ('plain', '2-level', '3-level')):
        runs = [r for r in res['runs'] if r['arm'] == arm and r.get('stages')]
        if not runs:
            continue
        for i, st in enumerate(runs[0]['stages']):
            per = [r['stages'][i] for r in runs]
            mean = lambda key: sum(p.get(key) or 0.0 for p in per) / len(per)   # noqa: E731
            spent = mean('gflops_end') - mean('gflops_start')
            mapped = '' if st.get('val_top1_mapped') is None else f"{mean('val_top1_mapped'):.1f}"
            # time_s is the training wall time at the stage's end, cumulative
            minutes = sum(r['stages'][i]['time_s'] - (r['stages'][i - 1]['time_s'] if i else 0.0)
                          for r in runs) / len(runs) / 60
            rows.append([arm, str(i + 1), str(st['level']), str(st['epochs']), f'{spent / 1e3:.1f}',
                         f'{minutes:.1f}', mapped, f"{mean('val_top1_end'):.1f}"])
    return '\n'.join([
        table(['schedule', 'stage', 'level', 'epochs', 'TFLOPs', 'minutes', 'top-1 after the mapping',
               'top-1 at the end'], rows),
        '',
        f"Means over {len(res['seeds'])} seeds. Level 1 is the full model; 'top-1 after the mapping' is the "
        f"test top-1 right after coalescing (going down) or after de-coalescing and interpolating (going up).",
        source(['multilevel_fmnist'], 'python benchmarks/multilevel_fmnist.py report')])


def t_papyri() -> str:
    res = load('papyri_detect')
    rows = []
    for r in res['rows']:
        t, seen = r['test'], r['test-seen']
        rows.append([r['name'] + (' (WBF)' if r['fused'] else ''), f"{t['detection']['mAP50']:.3f}",
                     f"{t['detection']['mAP']:.3f}", f"{t['recognition']['mAP50']:.3f}", f"{t['recognition']['mAP']:.3f}",
                     f"{seen['detection']['mAP50']:.3f}", f"{seen['recognition']['mAP']:.3f}",
                     f"{r['train_cpu_min']:.1f}"])
    v, pages, paper = res['verdict'], res['pages'], res['paper']
    checks = []
    if 'default_map50' in v:
        d = v['default_map50']
        checks.append(f"{res['default']} detection mAP@.5 {d['value']:.3f} after {d['cpu_min']:.1f} CPU-minutes "
                      f"of training (bar: >= {d['bar']} in under {d['bar_cpu_min']:.0f}): "
                      f"{'met' if d['met'] else 'missed'}")
    for key, e in v.items():
        if key.startswith('ensemble_'):
            task = key.split('_')[1]
            checks.append(f"{e['ensemble']} fused: {task} mAP@[.5:.95] {e['gap_mAP']:+.3f} over its best member "
                          f"({e['best_member']}), better on {e['pages_better']} of {e['pages']} test pages: "
                          f"{'met' if e['met'] else 'missed'}")
    test, seen, train = pages['test'], pages['test-seen'], pages['train']
    return '\n'.join([
        table(['detector', 'det. mAP@.5', 'det. mAP@[.5:.95]', 'rec. mAP@.5', 'rec. mAP@[.5:.95]',
               'seen fonts: det. mAP@.5', 'seen fonts: rec. mAP@[.5:.95]', 'training CPU-min'], rows,
              bold=(1, 2, 3, 4), lower=(7,)),
        '',
        'Against the bar: ' + '; '.join(checks) + '.',
        '',
        f"Trained on {train['pages']} generated pages (seed {train['seed']}, {len(train['fonts'])} DejaVu fonts), "
        f"scored by the organisers' metric on {test['pages']} test pages from another seed ({test['seed']}) in "
        f"a font family never seen in training (STIX, {len(test['fonts'])} files); the 'seen fonts' columns on "
        f"{seen['pages']} pages of seed {seen['seed']} in the training fonts. Every detector with "
        f"`train-detector`'s defaults (20 epochs of random 128-px crops, batch 4, AdamW), one training seed, "
        f"1 thread; fusion: {res['fusion']}. The training "
        f"time is the process's CPU time. For context only: the competition's winners reached "
        f"{paper['recognition_mAP']} recognition and {paper['detection_mAP']} detection mAP@[.5:.95] on the real "
        f"papyri, which these pages do not stand in for.",
        source(['papyri_detect'], 'python benchmarks/papyri_detect.py all')])
