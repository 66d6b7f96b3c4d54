"""The ``deitlab papyri`` subcommands (synth, train-detector, crops, pretrain-simclr, evaluate, predict,
demo): their parsers and the functions they run, imported by :mod:`deitlab.cli`. The papyri package
is imported only when a command runs, so ``--help`` stays torch-free."""
from __future__ import annotations

from pathlib import Path

from .cli_flags import add_config_args, add_output_flags, config_values, parse_kv, subcommand


def cmd_papyri_synth(args) -> dict:
    from .papyri.config import SynthConfig
    from .papyri.synth import synthesize
    values = config_values(args)
    if args.json:
        values.setdefault('progress', False)   # the last line is the JSON object
    result = synthesize(SynthConfig(**values).validate())
    if args.json:
        return result
    bt = result['base_types']
    return {'out': result['out'], 'pages': f'{result["pages"]} of {result["size"]} px',
            'glyphs': f'{result["glyphs"]} (bt1 {bt["bt1"]}, bt2 {bt["bt2"]}, bt3 {bt["bt3"]})',
            'annotations': result['annotations']}


def cmd_papyri_train_detector(args) -> dict:
    from .papyri.config import DetectorConfig
    from .papyri.detect import train_detector
    values = config_values(args)
    if args.json:
        values.setdefault('progress', False)   # the last line is the JSON object
    result = train_detector(DetectorConfig(**values).validate())
    if args.json:
        return result
    rows = {'run_dir': result['run_dir'], 'detector': f'{result["detector"]}, {result["params"] / 1e6:.2f}M params',
            'trained': f'{result["updates"]} updates on {result["train_images"]} pages ({result["train_boxes"]} '
                       f'boxes), {result["train_time_s"]:.0f} s'}
    if result.get('val_detection_mAP50') is not None:
        for task in ('detection', 'recognition'):
            rows[f'val {task}'] = (f'mAP@.5 {result[f"val_{task}_mAP50"]:.4f}  '
                                   f'mAP@[.5:.95] {result[f"val_{task}_mAP"]:.4f}')
    rows['weights'] = result['weights']
    return rows


def cmd_papyri_evaluate(args) -> dict:
    from .papyri.metric import EvaluateConfig, evaluate_files, summary_lines
    result = evaluate_files(EvaluateConfig(**config_values(args)))
    return result if args.json else summary_lines(result)


def cmd_papyri_predict(args) -> dict:
    from .papyri.config import PredictConfig
    from .papyri.predict import predict_files
    values = {**config_values(args), 'images': tuple(args.images)}
    if args.json:
        values.setdefault('progress', False)   # the last line is the JSON object
    result = predict_files(PredictConfig(**values))
    if args.json:
        return result
    blank = f' ({len(result["blank"])} blank: {", ".join(result["blank"])})' if result['blank'] else ''
    fused = f', fused by {result["fusion"]}' if result['fusion'] else ''
    refined = (f'; letters voted ({result["vote"]["rule"]}) by the detector and {", ".join(result["refiners"])}'
               if result.get('refiners') else '')
    return {'out': result['out'], 'pages': f'{result["pages"]}{blank}',
            'boxes': f'{result["boxes"]} from {len(result["detectors"])} detector(s){fused}{refined}; '
                     f'{result["in_text"]} letters in text/',
            'files': ', '.join(Path(f).name for f in result['files'].values())}


def _quiet_json(args, values: dict) -> dict:
    if args.json:
        values.setdefault('progress', False)   # the last line is the JSON object
    return values


def cmd_papyri_crops(args) -> dict:
    from .papyri.crops import write_crops
    from .papyri.refine_config import CropsConfig
    result = write_crops(CropsConfig(**_quiet_json(args, config_values(args))))
    if args.json:
        return result
    missing = f' (none of {result["letters_missing_in_train"]})' if result['letters_missing_in_train'] else ''
    return {'out': result['out'], 'crops': f'{result["train"]} train{missing}, {result["val"]} val, '
                                           f'{result["crop"]["size"]} px, margin {result["crop"]["margin"]}',
            'train with': f'deitlab train --data {result["data_spec"]} --model NAME --out RUN'}


def cmd_papyri_pretrain_simclr(args) -> dict:
    from .papyri.refine_config import SimCLRConfig
    from .papyri.simclr import pretrain_simclr
    values = _quiet_json(args, config_values(args))
    if isinstance(values.get('model_kwargs'), list):   # K=V words from the command line
        values['model_kwargs'] = parse_kv(values['model_kwargs'])
    result = pretrain_simclr(SimCLRConfig(**values))
    if args.json:
        return result
    return {'run_dir': result['run_dir'],
            'trained': f'{result["model"]}, {result["params"] / 1e6:.2f}M params, {result["updates"]} updates on '
                       f'windows of {result["pages"]} pages, {result["train_time_s"]:.0f} s',
            'last epoch': f'NT-Xent {result["train_loss"]:.4f} ({result["backend"]}), contrastive top-1 '
                          f'{result["contrastive_top1"]:.1f}%',
            'fine-tune with': result['fine_tune']}


def cmd_papyri_demo(args) -> dict:
    from .papyri.demo import run_papyri_demo
    result = run_papyri_demo(out=args.out, quick=args.quick, progress=not args.json)
    return result if args.json else {}   # without --json the demo has printed its table


def _refine_parsers(actions) -> None:
    from .papyri.refine_config import CropsConfig, SimCLRConfig
    q, g = subcommand(actions, 'crops', 'the letters of annotated pages cut out (context margin, squared, resized) '
                                        'as an image-folder dataset of the 24 letters that deitlab train trains any '
                                        'model on: the refiners\' data')
    add_config_args(q, g, CropsConfig, required=('data', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_papyri_crops)
    q, g = subcommand(actions, 'pretrain-simclr', 'SimCLR pretraining (NT-Xent, glyph-safe views) of a timm ResNet '
                                                  'on random windows of unlabelled pages; the backbone, head dropped, '
                                                  'is then fine-tuned with deitlab train on crops')
    add_config_args(q, g, SimCLRConfig, required=('images', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_papyri_pretrain_simclr)
    q, g = subcommand(actions, 'demo', 'the whole pipeline on generated pages in a few CPU minutes: a detector, a '
                                       'DeiT and a SimCLR refiner trained briefly, predictions with each and with '
                                       'the vote, scored')
    g['run'].add_argument('--out', default='papyri-demo', help='output directory (default: papyri-demo)')
    g['run'].add_argument('--quick', action='store_true', help='a smoke run of the same steps on small pages, under '
                                                               '2 CPU minutes (its numbers mean little)')
    add_output_flags(g)
    q.set_defaults(func=cmd_papyri_demo)


def _papyri_evaluate_parser(actions) -> None:
    from .papyri.metric import EvaluateConfig
    q, g = subcommand(actions, 'evaluate', "the organisers' metric of the ICDAR 2023 papyri competition: mAP@[.5:.95], "
                                           "mAP@.5, mAP@.75, mAR of COCO predictions, recognition (class-aware) and "
                                           "detection (class-agnostic), bt3 ground truth removed, maxDets 10000")
    add_config_args(q, g, EvaluateConfig, required=('pred', 'gt'))
    add_output_flags(g)
    q.set_defaults(func=cmd_papyri_evaluate)


def _papyri_predict_parser(actions) -> None:
    from .papyri.config import PredictConfig
    q, g = subcommand(actions, 'predict', 'letters on page images by one or several trained detectors (boxes fused by '
                                          'WBF), optionally re-classified by crop classifiers and a vote: COCO JSON, '
                                          'a COCO results list, CSV, overlays and reading-order text')
    g['data'].add_argument('images', nargs='+', metavar='IMAGES', help='page images, or directories of images')
    add_config_args(q, g, PredictConfig, required=('detector', 'out'), exclude=('images',))
    add_output_flags(g)
    q.set_defaults(func=cmd_papyri_predict)


def _papyri_train_detector_parser(actions) -> None:
    from .papyri.config import DetectorConfig
    q, g = subcommand(actions, 'train-detector', 'train a glyph detector (the 24 letters, boxed) on pages in the '
                                                 "competition's COCO schema into a run directory; torchvision's FCOS "
                                                 'from scratch by default')
    add_config_args(q, g, DetectorConfig, required=('data', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_papyri_train_detector)


def papyri_parser(p, groups) -> None:
    actions = p.add_subparsers(dest='action', required=True)
    from .papyri.config import SynthConfig
    q, g = subcommand(actions, 'synth', 'synthetic papyrus pages of Greek capitals, every glyph boxed and labelled '
                                        '(letter, BaseType) in the competition\'s COCO schema')
    add_config_args(q, g, SynthConfig, required=('pages', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_papyri_synth)
    _papyri_train_detector_parser(actions)
    _refine_parsers(actions)
    _papyri_evaluate_parser(actions)
    _papyri_predict_parser(actions)
