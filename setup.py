"""Build hook: the Snakemake workflow (Snakefile, rules, config, envs, profiles, report
templates, constraints) ships inside the package as ``deidflow/workflow``.

The files have one home, the top level of the repository, where a Snakemake user expects them;
the wheel gets them copied in at build time (``deidflow.settings`` finds either layout)."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# What `snakemake` needs next to the Snakefile, plus the lock the conda envs install against.
WORKFLOW = ["Snakefile", "constraints.txt", "rules/*.smk", "config/*.yaml", "config/README.md",
            "envs/*.yaml", "profiles/*/config.yaml", "report/*.rst"]


class BuildWithWorkflow(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the clone's own files
            return
        target = Path(self.build_lib) / "deidflow" / "workflow"
        for pattern in WORKFLOW:
            for src in sorted(ROOT.glob(pattern)):
                dest = target / src.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(src), str(dest))


setup(cmdclass={"build_py": BuildWithWorkflow})
