-- Version 6 of the embedded schema: a job's approval requests by job, so that the job's audit
-- records (`job_audit`) include those of its approvals (votes, rejection, staleness, expiry),
-- whose subject is the approval's id.
CREATE INDEX approvals_by_job ON approvals (tenant, job_id);
