"""The code MLflow runs to load an exported variant (MLflow's "models from code").

pipeline.report.registry logs this file as the pyfunc's model, so loading
``models:/ddpm-<scale>-<V>@best`` runs this project's code from the model's artifacts
(``code/pipeline``) and unpickles nothing. Not imported by the pipeline itself.
"""

from mlflow.models import set_model

from pipeline.report.registry import DDPMSampler

set_model(DDPMSampler())
