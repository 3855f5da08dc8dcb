"""Input records are read by `engine.data.records` (the visualizer reads them too); re-exported here."""

from engine.data.records import (  # noqa: F401
    ROLE_MAP,
    Conversation,
    InputPlan,
    RawRecord,
    RecordError,
    ShardTask,
    detect_kind,
    iter_json_array,
    iter_jsonl,
    iter_task_records,
    parse_record,
    plan_input,
)
