-- compose.yaml: the Prefect server's database beside MLflow's (POSTGRES_DB).
CREATE DATABASE prefect OWNER finetune;
