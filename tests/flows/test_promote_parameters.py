"""The promote deployment's parameters as Prefect validates them: a version given as a number or as a string."""

import jsonschema
from prefect.utilities.callables import parameter_schema

from flows.promote import promote_flow


def test_promote_takes_the_version_as_a_number_or_a_string():
    schema = parameter_schema(promote_flow.fn).model_dump()
    for version in (1, "1"):
        jsonschema.validate({"model_name": "tiny-test", "version": version}, schema)
