# One image for every labvault process; the compose command picks the service.
FROM python:3.11-slim
# gcc builds uWSGI; procps gives the workers' healthcheck pgrep.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev procps \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/labvault
COPY . .
RUN pip install --no-cache-dir '.[uwsgi,s3,postgres,stats]'
ENV LABVAULT_DATA_DIR=/var/lib/labvault
EXPOSE 8066 8121 8080 8181 8191
