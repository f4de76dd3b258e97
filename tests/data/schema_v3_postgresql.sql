-- The schema that alignd's hand-written migration runner (schema versions 1-3) left, as of its
-- last version: a database of an earlier alignd, for the upgrade test (tests/test_migrations.py).
CREATE TABLE completions (
	id TEXT NOT NULL, 
	created TIMESTAMP WITH TIME ZONE NOT NULL, 
	model TEXT NOT NULL, 
	policy_version INTEGER NOT NULL, 
	messages JSON NOT NULL, 
	params JSON NOT NULL, 
	"user" TEXT, 
	metadata JSON, 
	prompt_tokens INTEGER NOT NULL, 
	completion_tokens INTEGER NOT NULL, 
	latency_ms FLOAT NOT NULL, 
	stream BOOLEAN NOT NULL, 
	CONSTRAINT pk_completions PRIMARY KEY (id)
);

CREATE INDEX ix_completions_created ON completions (created);

CREATE INDEX ix_completions_policy_version ON completions (policy_version);

CREATE TABLE policies (
	version INTEGER NOT NULL, 
	status TEXT NOT NULL, 
	parent INTEGER, 
	run_id TEXT, 
	adapter_path TEXT, 
	metrics JSON NOT NULL, 
	reason TEXT, 
	created TIMESTAMP WITH TIME ZONE NOT NULL, 
	promoted_at TIMESTAMP WITH TIME ZONE, 
	CONSTRAINT pk_policies PRIMARY KEY (version)
);

CREATE INDEX ix_policies_status ON policies (status);

CREATE TABLE schema_migrations (
	version INTEGER NOT NULL, 
	name TEXT NOT NULL, 
	applied TIMESTAMP WITH TIME ZONE NOT NULL, 
	CONSTRAINT pk_schema_migrations PRIMARY KEY (version)
);

CREATE TABLE training_runs (
	id TEXT NOT NULL, 
	status TEXT NOT NULL, 
	phase TEXT NOT NULL, 
	progress FLOAT NOT NULL, 
	trigger TEXT NOT NULL, 
	parent INTEGER NOT NULL, 
	candidate INTEGER, 
	promoted BOOLEAN NOT NULL, 
	config JSON NOT NULL, 
	metrics JSON NOT NULL, 
	error TEXT, 
	created TIMESTAMP WITH TIME ZONE NOT NULL, 
	finished TIMESTAMP WITH TIME ZONE, 
	CONSTRAINT pk_training_runs PRIMARY KEY (id)
);

CREATE INDEX ix_training_runs_created ON training_runs (created);

CREATE INDEX ix_training_runs_status ON training_runs (status);

CREATE TABLE choices (
	completion_id TEXT NOT NULL, 
	index INTEGER NOT NULL, 
	text TEXT NOT NULL, 
	token_ids JSON NOT NULL, 
	finish_reason TEXT, 
	CONSTRAINT pk_choices PRIMARY KEY (completion_id, index), 
	CONSTRAINT fk_choices_completion_id_completions FOREIGN KEY(completion_id) REFERENCES completions (id) ON DELETE CASCADE
);

CREATE TABLE feedback (
	id TEXT NOT NULL, 
	completion_id TEXT NOT NULL, 
	kind TEXT NOT NULL, 
	choice INTEGER, 
	payload JSON NOT NULL, 
	"user" TEXT, 
	comment TEXT, 
	tags JSON NOT NULL, 
	idempotency_key TEXT, 
	request_hash TEXT, 
	policy_version INTEGER NOT NULL, 
	pair_count INTEGER NOT NULL, 
	label_count INTEGER NOT NULL, 
	created TIMESTAMP WITH TIME ZONE NOT NULL, 
	CONSTRAINT pk_feedback PRIMARY KEY (id), 
	CONSTRAINT fk_feedback_completion_id_completions FOREIGN KEY(completion_id) REFERENCES completions (id) ON DELETE CASCADE
);

CREATE INDEX ix_feedback_completion_id ON feedback (completion_id, kind);

CREATE INDEX ix_feedback_created ON feedback (created);

CREATE UNIQUE INDEX ix_feedback_idempotency_key ON feedback (idempotency_key);

CREATE TABLE labels (
	id SERIAL NOT NULL, 
	feedback_id TEXT NOT NULL, 
	completion_id TEXT NOT NULL, 
	kind TEXT NOT NULL, 
	policy_version INTEGER NOT NULL, 
	choice INTEGER, 
	prompt JSON NOT NULL, 
	reply TEXT NOT NULL, 
	good BOOLEAN NOT NULL, 
	weight FLOAT NOT NULL, 
	used_in_run TEXT, 
	created TIMESTAMP WITH TIME ZONE NOT NULL, 
	CONSTRAINT pk_labels PRIMARY KEY (id), 
	CONSTRAINT fk_labels_feedback_id_feedback FOREIGN KEY(feedback_id) REFERENCES feedback (id) ON DELETE CASCADE
);

CREATE INDEX ix_labels_created ON labels (created);

CREATE INDEX ix_labels_feedback_id ON labels (feedback_id);

CREATE TABLE preference_pairs (
	id SERIAL NOT NULL, 
	feedback_id TEXT NOT NULL, 
	completion_id TEXT NOT NULL, 
	kind TEXT NOT NULL, 
	policy_version INTEGER NOT NULL, 
	prompt JSON NOT NULL, 
	chosen TEXT NOT NULL, 
	rejected TEXT NOT NULL, 
	chosen_choice INTEGER, 
	rejected_choice INTEGER, 
	margin FLOAT NOT NULL, 
	weight FLOAT NOT NULL, 
	used_in_run TEXT, 
	created TIMESTAMP WITH TIME ZONE NOT NULL, 
	CONSTRAINT pk_preference_pairs PRIMARY KEY (id), 
	CONSTRAINT fk_preference_pairs_feedback_id_feedback FOREIGN KEY(feedback_id) REFERENCES feedback (id) ON DELETE CASCADE
);

CREATE INDEX ix_preference_pairs_created ON preference_pairs (created);

CREATE INDEX ix_preference_pairs_feedback_id ON preference_pairs (feedback_id);
