"""The studies: a config in, trained and compressed models, their records and report out.

`STUDIES` maps a config's ``study`` field to its module; each module has
``validate(config)`` (every field checked, resolved into typed plans, before any work)
and ``run(config, workdir)``. Both run their stages through `compressjax.studies.engine`.
"""

STUDIES = {"wireless": "compressjax.studies.wireless", "vision": "compressjax.studies.vision"}
