"""Models: the dual encoder, its towers, students built by shrinking a teacher, loading and saving."""

from mmkd.models.dual_encoder import DualEncoder, EncoderMeta  # noqa: F401
