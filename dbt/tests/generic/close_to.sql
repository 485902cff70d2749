{#
    Rows where `expression` and `expected` differ by more than `relative` of the larger
    magnitude (plus `absolute`, for values near zero): the arithmetic invariants of the
    marts (energy and time close) as tests.
#}
{% test close_to(model, expression, expected, relative=1e-9, absolute=1e-6) %}
select *
from {{ model }}
where
    abs(({{ expression }}) - ({{ expected }}))
    > {{ relative }} * greatest(abs({{ expression }}), abs({{ expected }})) + {{ absolute }}
{% endtest %}
