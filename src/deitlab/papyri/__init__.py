"""Greek papyri: the pipeline of Turnbull & Mannix, "Detecting and recognizing characters in Greek
papyri with YOLOv8, DeiT and SimCLR" (IJDAR 2024), on the data of the ICDAR 2023 competition on
detection and recognition of Greek letters on papyri.

``alphabet.py``: the 24 letters (sigma lunate), their competition category ids, the code points a
font draws them with; ``coco.py``: the competition's COCO-style annotation files (read, check,
write); ``config.py`` (torch-free): the commands' settings and :class:`PapyriError`; ``synth.py``:
synthetic papyrus pages with boxed, labelled glyphs (``deitlab papyri synth``); ``metric.py``: the
organisers' metric (``deitlab papyri evaluate``); ``fusion.py`` and ``tiling.py``: boxes of several
detectors or tiles merged; ``detect.py``: glyph detectors behind one interface and their training
(``deitlab papyri train-detector``; the torchvision models in ``detectors.py``, their data in
``detect_data.py``, the optional YOLOv8 detectors through ultralytics in ``yolo.py``); ``predict.py``:
detectors' letters on page images, fused and written as COCO, CSV, overlays and reading-order text
(``deitlab papyri predict``); ``outdir.py``: output directories written whole. The refiners:
``crops.py``: letter crops, one rule for training and inference, and the crops dataset
(``deitlab papyri crops``); ``simclr.py``: SimCLR pretraining of a ResNet on unlabelled pages
(``deitlab papyri pretrain-simclr``); ``refine.py``: classification runs as refiners of the detected
letters; ``vote.py``: the vote of the detector and the refiners; ``refine_config.py`` (torch-free):
the settings of crops and SimCLR; ``demo.py``: the whole pipeline in a few CPU minutes
(``deitlab papyri demo``).

The names below are imported from their modules on first use, so that importing the package stays
light.
"""
from ..lazy import lazy_exports

_HOME = {
    'PapyriError': 'config', 'SynthConfig': 'config', 'PredictConfig': 'config', 'DetectorConfig': 'config',
    'Detector': 'detect', 'load_detector': 'detect', 'train_detector': 'detect',
    'LETTERS': 'alphabet', 'NAMES': 'alphabet', 'CATEGORY_IDS': 'alphabet', 'category_id': 'alphabet',
    'class_of': 'alphabet', 'is_letter': 'alphabet', 'font_code_points': 'alphabet',
    'CocoError': 'coco', 'CocoDataset': 'coco', 'CocoImage': 'coco', 'CocoAnnotation': 'coco',
    'read_coco': 'coco', 'parse_coco': 'coco', 'write_coco': 'coco', 'check_coco': 'coco',
    'make_page': 'synth', 'synthesize': 'synth', 'base_type': 'synth', 'resolve_fonts': 'synth',
    'PagePrediction': 'predict', 'predict_pages': 'predict', 'write_outputs': 'predict',
    'reading_lines': 'predict', 'page_text': 'predict', 'predict_files': 'predict',
    'CropsConfig': 'refine_config', 'SimCLRConfig': 'refine_config',
    'CropPolicy': 'crops', 'crop_glyph': 'crops', 'write_crops': 'crops',
    'nt_xent': 'simclr', 'pretrain_simclr': 'simclr',
    'Refiner': 'refine', 'load_refiner': 'refine', 'refine_pages': 'refine',
    'VoteConfig': 'vote', 'run_papyri_demo': 'demo',
}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
