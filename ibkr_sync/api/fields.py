"""Serializer fields for exact decimals: what the sync stores, digit for digit."""

from decimal import Decimal

from django.db import models
from rest_framework import serializers

from ..decimals import plain


class ExactDecimalField(serializers.DecimalField):
    """A decimal as a string with the stored digits, never a float, no trailing zeros.

    DRF's `normalize_output` rounds to 28 significant digits (the default context); the
    columns hold up to 30, so trailing zeros are stripped here without any rounding.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("coerce_to_string", True)
        super().__init__(**kwargs)

    def to_representation(self, value):
        return None if value is None else plain(Decimal(value))


class ExactDecimalModelSerializer(serializers.ModelSerializer):
    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.DecimalField: ExactDecimalField,
    }
