{{/*
Names, labels, the rendered config.toml, and the checks that fail a bad
install early with a message that says what to change.
*/}}

{{- define "insights-enricher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "insights-enricher.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The StatefulSet's governing (headless) Service. */}}
{{- define "insights-enricher.headlessServiceName" -}}
{{- printf "%s-headless" (include "insights-enricher.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "insights-enricher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "insights-enricher.labels" -}}
helm.sh/chart: {{ include "insights-enricher.chart" . }}
{{ include "insights-enricher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "insights-enricher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "insights-enricher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "insights-enricher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "insights-enricher.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "insights-enricher.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "insights-enricher.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "insights-enricher.fullname" .) }}
{{- end }}

{{/* Where the chart mounts things inside the container. */}}
{{- define "insights-enricher.configDir" -}}/etc/insights-enricher{{- end }}
{{- define "insights-enricher.secretDir" -}}/var/run/secrets/insights-enricher{{- end }}
{{- define "insights-enricher.kafkaCaDir" -}}/etc/insights-enricher/kafka-ca{{- end }}
{{- define "insights-enricher.kafkaClientDir" -}}/etc/insights-enricher/kafka-client{{- end }}

{{/*
A config value as the binary will see it: the value set in .Values.config,
else the built-in default from config/default.toml (only for the few keys the
chart itself needs). Call with (list $ "section" "key" "default").
*/}}
{{- define "insights-enricher.configValue" -}}
{{- $root := index . 0 }}
{{- $section := index $root.Values.config (index . 1) | default dict }}
{{- $value := index $section (index . 2) }}
{{- if kindIs "invalid" $value }}{{ index . 3 }}{{ else }}{{ $value }}{{ end }}
{{- end }}

{{- define "insights-enricher.usesSasl" -}}
{{- $p := include "insights-enricher.configValue" (list . "kafka" "security_protocol" "plaintext") }}
{{- if hasPrefix "sasl_" $p }}true{{ end }}
{{- end }}

{{- define "insights-enricher.usesTls" -}}
{{- $p := include "insights-enricher.configValue" (list . "kafka" "security_protocol" "plaintext") }}
{{- if or (eq $p "ssl") (eq $p "sasl_ssl") }}true{{ end }}
{{- end }}

{{/*
Whole seconds in a humantime duration of the compact form the schema allows
("25s", "1m30s", "1500ms"; milliseconds round up).
*/}}
{{- define "insights-enricher.durationSeconds" -}}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d)" (toString .) -1 }}
{{- $n := regexFind "^[0-9]+" . | atoi }}
{{- $unit := trimPrefix (toString $n) . }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- else if eq $unit "d" }}{{ $ms = add $ms (mul $n 86400000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
The config tree the binary reads: .Values.config as given (only keys that are
set), plus what the chart owns: the listen address and the paths of the
mounted secrets and TLS files.
*/}}
{{- define "insights-enricher.configToml" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $server := index $cfg "server" | default dict }}
{{- $_ := set $server "listen" (printf "0.0.0.0:%d" (int .Values.containerPort)) }}
{{- $_ = set $cfg "server" $server }}
{{- $secretDir := include "insights-enricher.secretDir" . }}
{{- $finbox := index $cfg "finbox" | default dict }}
{{- $_ = set $finbox "api_key_file" (printf "%s/finbox-api-key" $secretDir) }}
{{- $_ = set $finbox "server_hash_file" (printf "%s/finbox-server-hash" $secretDir) }}
{{- $_ = set $cfg "finbox" $finbox }}
{{- $credeau := index $cfg "credeau" | default dict }}
{{- $_ = set $credeau "auth_token_file" (printf "%s/credeau-auth-token" $secretDir) }}
{{- $_ = set $cfg "credeau" $credeau }}
{{- $kafka := index $cfg "kafka" | default dict }}
{{- if include "insights-enricher.usesSasl" . }}
{{- $_ = set $kafka "sasl_password_file" (printf "%s/kafka-sasl-password" $secretDir) }}
{{- end }}
{{- if .Values.kafkaTls.enabled }}
{{- if .Values.kafkaTls.ca.secretName }}
{{- $_ = set $kafka "ssl_ca_location" (printf "%s/ca.crt" (include "insights-enricher.kafkaCaDir" .)) }}
{{- end }}
{{- if .Values.kafkaTls.client.secretName }}
{{- $_ = set $kafka "ssl_certificate_location" (printf "%s/tls.crt" (include "insights-enricher.kafkaClientDir" .)) }}
{{- $_ = set $kafka "ssl_key_location" (printf "%s/tls.key" (include "insights-enricher.kafkaClientDir" .)) }}
{{- end }}
{{- end }}
{{- $encoding := index $cfg "encoding" | default dict }}
{{- if $encoding.schema_registry_username }}
{{- $_ = set $encoding "schema_registry_password_file" (printf "%s/schema-registry-password" $secretDir) }}
{{- $_ = set $cfg "encoding" $encoding }}
{{- end }}
{{- if not (hasKey $kafka "static_membership") }}
{{- $_ = set $kafka "static_membership" (eq .Values.workload.kind "StatefulSet") }}
{{- end }}
{{- $_ = set $cfg "kafka" $kafka }}
{{- range $section := keys $cfg | sortAlpha }}
{{- $keys := index $cfg $section }}
{{- if $keys }}
{{- $tables := list }}
{{ printf "[%s]" $section }}
{{- range $key := keys $keys | sortAlpha }}
{{- $v := index $keys $key }}
{{- if kindIs "map" $v }}
{{- $tables = append $tables $key }}
{{- else }}
{{ $key }} = {{ include "insights-enricher.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $table := $tables }}
{{ printf "[%s.%s]" $section $table }}
{{- $map := index $keys $table }}
{{- range $k := keys $map | sortAlpha }}
{{ toJson $k }} = {{ include "insights-enricher.tomlValue" (index $map $k) }}
{{- end }}
{{- end }}
{{ end }}
{{- end }}
{{- end }}

{{/*
One TOML value. Helm reads numbers from values files as float64, so a
whole number is written as a TOML integer (the binary's float keys accept
integers; its integer keys reject 6.0). JSON string and array syntax is
valid TOML for strings and lists of strings.
*/}}
{{- define "insights-enricher.tomlValue" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ printf "%d" (int64 .) }}{{ else }}{{ printf "%v" . }}{{ end }}
{{- else if or (kindIs "int64" .) (kindIs "int" .) (kindIs "bool" .) }}
{{- printf "%v" . }}
{{- else }}
{{- toJson . }}
{{- end }}
{{- end }}

{{/*
The values without which a pod cannot start (its configuration would fail
check-config, or reach no broker): all missing ones named in one message.
*/}}
{{- define "insights-enricher.requireRunnable" -}}
{{- $missing := list }}
{{- $kafka := .Values.config.kafka | default dict }}
{{- if not $kafka.bootstrap_servers }}
{{- $missing = append $missing "config.kafka.bootstrap_servers (the Kafka brokers, host:port,...)" }}
{{- end }}
{{- if not (.Values.config.credeau | default dict).client_id }}
{{- $missing = append $missing "config.credeau.client_id (the client id Credeau issued)" }}
{{- end }}
{{- $s := .Values.secrets }}
{{- if not $s.existingSecret }}
{{- range $value := list "finboxApiKey" "finboxServerHash" "credeauAuthToken" }}
{{- if not (index $s $value) }}
{{- $missing = append $missing (printf "secrets.%s" $value) }}
{{- end }}
{{- end }}
{{- if and (hasPrefix "sasl_" (toString ($kafka.security_protocol | default ""))) (not $s.kafkaSaslPassword) }}
{{- $missing = append $missing "secrets.kafkaSaslPassword (config.kafka.security_protocol is SASL)" }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "the chart cannot run without these values: %s. Secrets may come from secrets.existingSecret instead (a Secret with the keys finbox-api-key, finbox-server-hash, credeau-auth-token and, with SASL, kafka-sasl-password); see docs/deploy.md" (join ", " $missing)) }}
{{- end }}
{{- end }}

{{/*
Checks the schema cannot express. Each failure names the value to change.
*/}}
{{- define "insights-enricher.validate" -}}
{{- include "insights-enricher.requireRunnable" . }}
{{- $secretKeys := dict "finbox" (list "api_key" "api_key_file" "server_hash" "server_hash_file") "credeau" (list "auth_token" "auth_token_file") "kafka" (list "sasl_password" "sasl_password_file" "ssl_key_password" "ssl_key_password_file") "encoding" (list "schema_registry_password" "schema_registry_password_file") }}
{{- range $section, $keys := $secretKeys }}
{{- $given := index $.Values.config $section | default dict }}
{{- range $keys }}
{{- if hasKey $given . }}
{{- fail (printf "config.%s.%s must not be set: secrets never go into the ConfigMap; use secrets.* or secrets.existingSecret (the chart wires the *_file keys)" $section .) }}
{{- end }}
{{- end }}
{{- end }}
{{- $urlKeys := dict "encoding" (list "schema_registry_url" "config.encoding.schema_registry_username and secrets.schemaRegistryPassword") "finbox" (list "base_url" "secrets.finboxApiKey and secrets.finboxServerHash") "credeau" (list "base_url" "config.credeau.client_id and secrets.credeauAuthToken") }}
{{- range $section, $spec := $urlKeys }}
{{- $url := index ($.Values.config | default dict) $section | default dict | dig (first $spec) "" | toString }}
{{- if regexMatch "^[^/]*//[^/@]*@" $url }}
{{- fail (printf "config.%s.%s must not hold credentials (user:password@): they would be stored in the ConfigMap; set %s instead" $section (first $spec) (last $spec)) }}
{{- end }}
{{- end }}
{{- $registryUser := (.Values.config.encoding | default dict).schema_registry_username }}
{{- if and .Values.secrets.schemaRegistryPassword (not $registryUser) }}
{{- fail "secrets.schemaRegistryPassword needs config.encoding.schema_registry_username (the registry's user name; Confluent Cloud: the API key)" }}
{{- end }}
{{- if and $registryUser (not .Values.secrets.existingSecret) (not .Values.secrets.schemaRegistryPassword) }}
{{- fail "config.encoding.schema_registry_username needs secrets.schemaRegistryPassword (or secrets.existingSecret holding the key schema-registry-password)" }}
{{- end }}
{{- if hasKey (.Values.config.server | default dict) "listen" }}
{{- fail "config.server.listen must not be set: the chart derives it from containerPort" }}
{{- end }}
{{- if not (has .Values.workload.kind (list "Deployment" "StatefulSet")) }}
{{- fail (printf "workload.kind must be Deployment or StatefulSet, not %q" (toString .Values.workload.kind)) }}
{{- end }}
{{- if and .Values.keda.enabled (lt (int .Values.keda.minReplicas) 1) }}
{{- fail (printf "keda.minReplicas must be at least 1 (got %d): with no replica left nobody polls the delay topics, so waiting users are never polled again (KEDA's kafka trigger sees only the input topic's lag)" (int .Values.keda.minReplicas)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: a HorizontalPodAutoscaler and a KEDA ScaledObject would fight over the replica count; enable one" }}
{{- end }}
{{- $shutdown := include "insights-enricher.configValue" (list . "shutdown" "timeout" "25s") }}
{{- $shutdownSeconds := include "insights-enricher.durationSeconds" $shutdown | int }}
{{- if le (int .Values.terminationGracePeriodSeconds) $shutdownSeconds }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than config.shutdown.timeout (%s = %ds), or Kubernetes kills the pod before it has committed its in-flight work" (int .Values.terminationGracePeriodSeconds) $shutdown $shutdownSeconds) }}
{{- end }}
{{- if and .Values.kafkaTls.enabled (not (include "insights-enricher.usesTls" .)) }}
{{- fail "kafkaTls.enabled needs config.kafka.security_protocol ssl or sasl_ssl" }}
{{- end }}
{{- if and .Values.kafkaTls.enabled (not .Values.kafkaTls.ca.secretName) (not .Values.kafkaTls.client.secretName) }}
{{- fail "kafkaTls.enabled needs kafkaTls.ca.secretName and/or kafkaTls.client.secretName (for TLS with the system roots only, leave kafkaTls.enabled false)" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (ne (toString $pdb.minAvailable) "") (ne (toString $pdb.maxUnavailable) "") }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to \"\")" }}
{{- end }}
{{- if and $pdb.enabled (eq (toString $pdb.minAvailable) "") (eq (toString $pdb.maxUnavailable) "") }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- fail "keda.minReplicas must not exceed keda.maxReplicas" }}
{{- end }}
{{- end }}

{{/* PromQL matchers for this release's series. */}}
{{- define "insights-enricher.promSelector" -}}
{{- .Values.prometheusRule.selector | default (printf "job=%q,namespace=%q" (include "insights-enricher.fullname" .) .Release.Namespace) }}
{{- end }}
