"""Data: data sets (COCO, Pascal VOC, YOLO, generated shapes), augmentation and loading."""
