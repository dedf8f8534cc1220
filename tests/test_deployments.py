"""The files in deployments/ are valid: configs load, the unit files verify."""

import os
import shutil
from pathlib import Path

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from balance.config.load import load_text
from balance.config.validate import load_config, validate

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


class DeploymentTests(unittest.TestCase):
    def test_configs(self):
        """The configs shipped for systemd and containers are valid."""
        for path in ("systemd/balance-activated.yaml", "container/balance.yaml"):
            load_config(str(DEPLOYMENTS / path))

    def test_kubernetesConfigMap(self):
        """The ConfigMap in the Kubernetes manifests holds a valid config."""
        docs = list(yaml.safe_load_all((DEPLOYMENTS / "kubernetes" / "balance.yaml").read_text()))
        [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
        validate(load_text(config_map["data"]["balance.yaml"], "cm"), "cm")
        [deployment] = [d for d in docs if d["kind"] == "Deployment"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(container["readinessProbe"]["httpGet"]["path"], "/healthz")

    @inlineCallbacks
    def test_systemdVerify(self):
        """systemd-analyze verify accepts the units, where systemd is installed."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        units = [
            str(DEPLOYMENTS / "systemd" / name)
            for name in ("balance.service", "balance-activated.socket", "balance-activated.service")
        ]
        out, err, code = yield getProcessOutputAndValue(
            tool, ["verify", *units], env=dict(os.environ, SYSTEMD_LOG_LEVEL="err")
        )
        # Executables named in the units need not exist on the test machine.
        problems = [
            line
            for line in err.decode().splitlines()
            if line.strip() and "is not executable" not in line and "No such file" not in line
        ]
        self.assertEqual(problems, [])
