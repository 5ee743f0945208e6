# deidflow: de-identify a medical-imaging export into a shareable release.
# Run from a clone:  snakemake --cores 8 --config input=/data/export output=/data/release
# or through the CLI: deidflow run /data/export /data/release --cores 8
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, os.path.join(workflow.basedir, "config", "schema.yaml"))


include: "rules/common.smk"
include: "rules/dicom.smk"
include: "rules/other.smk"
include: "rules/convert.smk"
include: "rules/face.smk"
include: "rules/mapping.smk"
include: "rules/verify.smk"
include: "rules/publish.smk"
include: "rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True


onstart:
    mark_incomplete(OUT, RESTRICTED)  # RELEASE_INCOMPLETE from the first job until the run succeeds


onsuccess:
    for _line in finalize_run(OUT, RESTRICTED, UNITS):
        print(_line, file=sys.stderr)
