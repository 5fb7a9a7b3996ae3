"""Config compatibility of checkpoints: differing fields are named; fields added to the project after a
checkpoint was written count as equal at their defaults."""

from solidmark_jax.training import checkpoint as ckpt

from configs import tiny


def _record(config, drop=()):
  fields = ckpt.fingerprint_fields(config)
  for section, key in drop:
    del fields[section][key]
  return fields


def test_diff_names_changed_fields():
  a, b = tiny.get_config(), tiny.get_config()
  b.marks.pad = 3
  diffs = ckpt._diff(_record(a), ckpt.fingerprint_fields(b), defaults=ckpt._default_fields())
  assert diffs == ["marks.pad: checkpoint 2 vs config 3"]


def test_field_added_later_is_equal_at_its_default_only():
  old = _record(tiny.get_config(), drop=[("model", "use_linear_projection")])  # written before the field existed
  c = tiny.get_config()
  assert ckpt._diff(old, ckpt.fingerprint_fields(c), defaults=ckpt._default_fields()) == []
  c.model.use_linear_projection = True  # not what the older code did: a real difference
  assert ckpt._diff(old, ckpt.fingerprint_fields(c), defaults=ckpt._default_fields()) == [
      "model.use_linear_projection: checkpoint None vs config True"]
