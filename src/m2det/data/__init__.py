"""Data: data sets (COCO, Pascal VOC, YOLO, image folders with VOC XMLs, generated shapes),
augmentation and loading.

`build_dataset(source, split)` reads any of these formats into `(image, target)` samples
(see `DetectionDataset`); `build_train_transform` / `build_eval_transform` make them square
model inputs; `collate_fn` / `build_loader` batch them.
"""

from m2det.data.base import DataReport, DatasetError, DetectionDataset, ImageInfo, Record
from m2det.data.build import build_dataset
from m2det.data.coco import CocoDetection
from m2det.data.folder import VOCImageFolder
from m2det.data.loader import build_loader, collate_fn
from m2det.data.synthetic import GeneratedShapes, ShapesConfig, ShapesSplit, generate_shapes_dataset
from m2det.data.transforms import (
    MEAN_FILL_RGB,
    AugmentSettings,
    PhotometricDistort,
    SSDRandomCrop,
    SSDZoomOut,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
)
from m2det.data.voc import VOCDetection
from m2det.data.yolo import YOLODetection

__all__ = [
    "MEAN_FILL_RGB",
    "AugmentSettings",
    "CocoDetection",
    "DataReport",
    "DatasetError",
    "DetectionDataset",
    "GeneratedShapes",
    "ImageInfo",
    "PhotometricDistort",
    "Record",
    "ShapesConfig",
    "ShapesSplit",
    "SSDRandomCrop",
    "SSDZoomOut",
    "TrainTransform",
    "VOCDetection",
    "VOCImageFolder",
    "YOLODetection",
    "build_dataset",
    "build_eval_transform",
    "build_loader",
    "build_train_transform",
    "collate_fn",
    "generate_shapes_dataset",
]
