{# The allocation window [min_hour, max_hour) the run was asked for, as timestamptz. #}
{% macro window_start() -%}
    cast('{{ var("min_hour") }}' as timestamptz)
{%- endmacro %}

{% macro window_end() -%}
    cast('{{ var("max_hour") }}' as timestamptz)
{%- endmacro %}

{# Seconds between two timestamps, as a double. Epoch microseconds, not date_diff:
   date_diff on timestamptz goes through ICU's calendar and costs 3x the whole
   allocation's other work on 20 M request-slice rows (bench/allocate.py). #}
{% macro seconds_between(start_ts, end_ts) -%}
    ((epoch_us({{ end_ts }}) - epoch_us({{ start_ts }})) / 1e6)
{%- endmacro %}

{# Replace the window's rows of an incremental model before inserting them again. #}
{% macro delete_window(column) -%}
    {% if is_incremental() %}
        delete from {{ this }}
        where {{ column }} >= {{ window_start() }} and {{ column }} < {{ window_end() }}
    {% endif %}
{%- endmacro %}

{# A VALUES relation from a list of dicts in a var: rows of the given keys. #}
{% macro values_from_var(name, keys, types) -%}
    {%- set rows = var(name) -%}
    {%- if rows | length == 0 -%}
        select
        {%- for key in keys %}
            cast(null as {{ types[loop.index0] }}) as {{ key }}{{ "," if not loop.last }}
        {%- endfor %}
        where false
    {%- else -%}
        select * from (
            values
            {%- for row in rows %}
                (
                {%- for key in keys -%}
                    cast({{ "'" ~ row[key] ~ "'" if types[loop.index0] == 'varchar' else row[key] }}
                        as {{ types[loop.index0] }}){{ ", " if not loop.last }}
                {%- endfor -%}
                ){{ "," if not loop.last }}
            {%- endfor %}
        ) as v ({{ keys | join(", ") }})
    {%- endif -%}
{%- endmacro %}

{# The whole UTC days the window touches, [first day, day after the last). #}
{% macro window_days_start() -%}
    date_trunc('day', {{ window_start() }})
{%- endmacro %}

{% macro window_days_end() -%}
    (date_trunc('day', {{ window_end() }} - interval 1 microsecond) + interval 1 day)
{%- endmacro %}

{# Replace the rows of every day the window touches (daily marts built from hours). #}
{% macro delete_window_days(column) -%}
    {% if is_incremental() %}
        delete from {{ this }}
        where {{ column }} >= cast({{ window_days_start() }} as date)
            and {{ column }} < cast({{ window_days_end() }} as date)
    {% endif %}
{%- endmacro %}

{# Replace the rows of every billing period (YYYY-MM) of the window (month-aligned). #}
{% macro delete_window_periods(column) -%}
    {% if is_incremental() %}
        delete from {{ this }}
        where {{ column }} >= strftime({{ window_start() }}, '%Y-%m')
            and {{ column }} < strftime({{ window_end() }}, '%Y-%m')
    {% endif %}
{%- endmacro %}
