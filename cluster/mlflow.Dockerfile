# Build: docker build -f cluster/mlflow.Dockerfile -t sprout-mlflow:3.17.2 cluster
#
# The MLflow tracking server image for cluster/kuberay/mlflow.yaml: MLflow at the version
# pinned in requirements.txt with its auth extra (Flask-WTF, for the basic-auth app), the
# PostgreSQL driver (backend and basic-auth user stores) and boto3 (proxied artifacts in
# s3://), all as pinned in requirements.txt.
FROM python:3.11-slim

RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 boto3==1.44.5 \
 && useradd --uid 1000 --create-home mlflow

USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
