"""Corrections to moto where it errs against AWS inside a single call, so the emulator cannot
answer around it. The emulator's moto process loads this file (its directory is on
PYTHONPATH); each correction names the AWS behaviour it restores and has a conformance test
in tests/emulator.rs.
"""

from moto.core.types import Base64EncodedString
from moto.ec2.models import launch_templates
from moto.ec2.utils import parse_user_data

_version_init = launch_templates.LaunchTemplateVersion.__init__


def _version_with_parsed_user_data(self, template, number, data, description):
    # CreateLaunchTemplate parses UserData, CreateLaunchTemplateVersion keeps it a plain
    # string, and an Auto Scaling group launching from such a version fails an assertion
    # (HTTP 500). AWS launches from any version: parse it as CreateLaunchTemplate does.
    user_data = data.get("UserData")
    if user_data is not None and not isinstance(user_data, Base64EncodedString):
        data = {**data, "UserData": parse_user_data(user_data)}
    _version_init(self, template, number, data, description)


launch_templates.LaunchTemplateVersion.__init__ = _version_with_parsed_user_data
