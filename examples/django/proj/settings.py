"""Settings of the example project, from the environment where a run needs its own values.

``SHOP_DB_NAME`` (default ``shop``), ``SHOP_DB_HOST``, ``SHOP_DB_PORT``, ``SHOP_DB_USER``,
``SHOP_DB_PASSWORD``: the PostgreSQL database of the orders *and* of the outbox (one
transaction writes both). ``BROKER_URL``: RabbitMQ (or Redis). ``ORDERS_QUEUE`` (read in
shop/tasks.py): the commands' queue. ``OUTBOX_WEB_URL``: the operator's page
(``orch-outbox web``), linked from the admin's outbox page.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "proj.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "orch_outbox.contrib.django",  # manage.py outbox_migrate, the admin's outbox page
    "shop",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("SHOP_DB_NAME", "shop"),
        "HOST": os.environ.get("SHOP_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("SHOP_DB_PORT", "5432"),
        "USER": os.environ.get("SHOP_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("SHOP_DB_PASSWORD", ""),
    }
}

# Celery, and the outbox's settings (CELERY_OUTBOX_* are the outbox_* settings of docs/settings.md).
CELERY_BROKER_URL = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "orch_outbox.beat:Scheduler"  # beat runs the relay (LISTEN/NOTIFY) and the rescuer
CELERY_TASK_SERIALIZER = CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_OUTBOX_WEB_URL = os.environ.get("OUTBOX_WEB_URL", "")
