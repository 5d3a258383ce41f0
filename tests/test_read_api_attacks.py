"""Attacks on the read API's query parameters: one form for a currency code everywhere."""

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


@pytest.fixture
def reader(django_user_model):
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_position", "view_cashbalance"])
    )
    client = APIClient()
    client.force_authenticate(user)
    return client


# Letters that are not ASCII but whose upper case is: the dotless i (INR), the long s
# (USD), the ligatures ﬀ / ﬆ, the sharp s (SS).
@pytest.mark.parametrize("text", ["\u0131nr", "u\u017fd", "\ufb00x", "\u00dfd", "\ufb06d"])
@pytest.mark.parametrize("endpoint", ["/portfolio/positions", "/portfolio/cash"])
def test_a_currency_filter_is_a_code_only_in_ascii_letters(reader, endpoint, text):
    response = reader.get(endpoint, {"currency": text})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_query"
