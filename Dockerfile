# One image for every labvault process; the command picks the service.
FROM python:3.11-slim
WORKDIR /srv/labvault
COPY . .
RUN pip install --no-cache-dir '.[uwsgi,s3,postgres,stats]'
ENV LABVAULT_DATA_DIR=/var/lib/labvault
