"""Glue to other frameworks, each imported only on request (the core never imports them).

- ``visdistill.integrations.mmdet``: detection distillation inside mmdet 3.x configs (needs the
  ``mmdet`` extra: ``bash scripts/install_mmdet.sh``).
- ``visdistill.integrations.mosaic_coco``: the Fashion-MNIST mosaic detection set (numpy + Pillow).
"""
