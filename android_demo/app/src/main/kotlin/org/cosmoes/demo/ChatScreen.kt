// The chat screen (Compose, Material 3): bundle chooser, expert policy and memory budget pickers, prompt, streamed
// answer and the statistics of the generation. Stateless pieces; all state lives in DemoViewModel.
package org.cosmoes.demo

import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.result.contract.ActivityResultContracts
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.imePadding
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.width
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.selection.selectable
import androidx.compose.foundation.text.KeyboardOptions
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.CardDefaults
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.RadioButton
import androidx.compose.material3.Scaffold
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.res.stringResource
import androidx.compose.ui.semantics.Role
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.text.input.KeyboardType
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import androidx.lifecycle.viewmodel.compose.viewModel
import java.io.File
import org.cosmoes.Stats

@Composable
fun ChatScreen(viewModel: DemoViewModel = viewModel()) {
    val state: ChatState by viewModel.state.collectAsStateWithLifecycle()
    val pickFolder = rememberLauncherForActivityResult(ActivityResultContracts.OpenDocumentTree()) { tree ->
        tree?.let(viewModel::importFolder)
    }
    val idle = state.busy == Busy.IDLE
    Scaffold { padding ->
        Column(
            Modifier.fillMaxSize().padding(padding).imePadding().padding(16.dp).verticalScroll(rememberScrollState()),
            verticalArrangement = Arrangement.spacedBy(12.dp),
        ) {
            state.error?.let { ErrorCard(it, viewModel::dismissError) }
            BundleChooser(state.bundles, state.bundle, viewModel.pushDir?.path ?: "", idle, viewModel::selectBundle,
                onPick = { pickFolder.launch(null) }, onRefresh = viewModel::refreshBundles)
            PolicyPicker(state.policy, state.lruSlots, idle, viewModel::setPolicy, viewModel::setLruSlots)
            BudgetPicker(state.budget, state.autoBudgetMb, state.fixedBudgetMb, idle, viewModel::setBudget,
                viewModel::setFixedBudget)
            PromptField(state.prompt, state.maxNewTokens, idle, viewModel::setPrompt, viewModel::setMaxNewTokens)
            Controls(state, onGenerate = viewModel::generate, onStop = viewModel::stop)
            LiveLine(state)
            if (state.output.isNotEmpty()) OutputCard(state.output)
            state.stats?.let { StatsCard(it) }
        }
    }
}

@Composable
private fun ErrorCard(message: String, onDismiss: () -> Unit) {
    Card(colors = CardDefaults.cardColors(containerColor = MaterialTheme.colorScheme.errorContainer)) {
        Row(Modifier.padding(12.dp), verticalAlignment = Alignment.CenterVertically) {
            Text(message, Modifier.weight(1f), color = MaterialTheme.colorScheme.onErrorContainer)
            TextButton(onClick = onDismiss) { Text(stringResource(R.string.dismiss)) }
        }
    }
}

@Composable
private fun BundleChooser(
    bundles: List<File>,
    selected: File?,
    pushDir: String,
    enabled: Boolean,
    onSelect: (File) -> Unit,
    onPick: () -> Unit,
    onRefresh: () -> Unit,
) {
    Section(stringResource(R.string.bundle)) {
        if (bundles.isEmpty()) Text(stringResource(R.string.no_bundles, pushDir), style = MaterialTheme.typography.bodySmall)
        bundles.forEach { dir ->
            Choice(dir.name, dir == selected, enabled) { onSelect(dir) }
        }
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            OutlinedButton(onClick = onPick, enabled = enabled) { Text(stringResource(R.string.pick_folder)) }
            TextButton(onClick = onRefresh, enabled = enabled) { Text(stringResource(R.string.refresh)) }
        }
    }
}

@Composable
private fun PolicyPicker(
    policy: PolicyKind,
    lruSlots: Int,
    enabled: Boolean,
    onPolicy: (PolicyKind) -> Unit,
    onSlots: (Int) -> Unit,
) {
    Section(stringResource(R.string.policy)) {
        Row {
            PolicyKind.entries.forEach { kind ->
                Choice(kind.label, kind == policy, enabled, Modifier.weight(1f)) { onPolicy(kind) }
            }
        }
        if (policy == PolicyKind.LRU) {
            NumberField(lruSlots, stringResource(R.string.lru_slots), enabled, onSlots)
        }
    }
}

@Composable
private fun BudgetPicker(
    budget: BudgetKind,
    autoMb: Double?,
    fixedMb: String,
    enabled: Boolean,
    onBudget: (BudgetKind) -> Unit,
    onFixed: (String) -> Unit,
) {
    Section(stringResource(R.string.budget)) {
        Choice(stringResource(R.string.budget_off), budget == BudgetKind.OFF, enabled) { onBudget(BudgetKind.OFF) }
        Choice(stringResource(R.string.budget_auto, autoMb ?: 0.0), budget == BudgetKind.AUTO, enabled && autoMb != null) {
            onBudget(BudgetKind.AUTO)
        }
        Choice(stringResource(R.string.budget_fixed), budget == BudgetKind.FIXED, enabled) { onBudget(BudgetKind.FIXED) }
        if (budget == BudgetKind.FIXED) {
            OutlinedTextField(fixedMb, onFixed, Modifier.fillMaxWidth(), enabled = enabled, singleLine = true,
                label = { Text(stringResource(R.string.budget_mb)) },
                keyboardOptions = KeyboardOptions(keyboardType = KeyboardType.Decimal))
        }
        if (budget != BudgetKind.OFF) {
            Text(stringResource(R.string.budget_overrides), style = MaterialTheme.typography.bodySmall)
        }
    }
}

@Composable
private fun PromptField(prompt: String, maxNewTokens: Int, enabled: Boolean, onPrompt: (String) -> Unit, onMax: (Int) -> Unit) {
    OutlinedTextField(prompt, onPrompt, Modifier.fillMaxWidth(), enabled = enabled, minLines = 3,
        label = { Text(stringResource(R.string.prompt)) })
    NumberField(maxNewTokens, stringResource(R.string.max_new_tokens), enabled, onMax)
}

@Composable
private fun Controls(state: ChatState, onGenerate: () -> Unit, onStop: () -> Unit) {
    Row(verticalAlignment = Alignment.CenterVertically, horizontalArrangement = Arrangement.spacedBy(12.dp)) {
        if (state.busy == Busy.GENERATING) {
            Button(onClick = onStop) { Text(stringResource(R.string.stop)) }
        } else {
            Button(onClick = onGenerate, enabled = state.canGenerate) { Text(stringResource(R.string.generate)) }
        }
        when (state.busy) {
            Busy.OPENING -> Text(stringResource(R.string.opening))
            Busy.IMPORTING -> Text(stringResource(R.string.importing))
            else -> Unit
        }
    }
    if (state.busy == Busy.OPENING || state.busy == Busy.IMPORTING) LinearProgressIndicator(Modifier.fillMaxWidth())
}

@Composable
private fun LiveLine(state: ChatState) {
    if (state.busy != Busy.GENERATING) return
    Row(horizontalArrangement = Arrangement.spacedBy(16.dp)) {
        state.liveDecodeTokS?.let { Text(stringResource(R.string.live_speed, it)) }
        state.rssMb?.let { Text(stringResource(R.string.rss_now, it)) }
    }
}

@Composable
private fun OutputCard(output: String) {
    Card(Modifier.fillMaxWidth()) {
        Text(output, Modifier.padding(12.dp))
    }
}

@Composable
private fun StatsCard(stats: Stats) {
    Card(Modifier.fillMaxWidth()) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(4.dp)) {
            val mono = MaterialTheme.typography.bodySmall.copy(fontFamily = FontFamily.Monospace)
            Text(stringResource(R.string.stats_speed, stats.decodeTokS, stats.prefillTokS, stats.ttftMs), style = mono)
            Text(stringResource(R.string.stats_memory, stats.peakRssMb, stats.expertLoads, stats.expertEvictions), style = mono)
            if (stats.residentPerLayer.isNotEmpty()) {
                Text(stringResource(R.string.stats_resident, stats.residentPerLayer.joinToString(" ")), style = mono)
            }
        }
    }
}

@Composable
private fun Section(title: String, content: @Composable () -> Unit) {
    Column(verticalArrangement = Arrangement.spacedBy(4.dp)) {
        Text(title, style = MaterialTheme.typography.titleSmall)
        content()
    }
}

@Composable
private fun Choice(label: String, selected: Boolean, enabled: Boolean, modifier: Modifier = Modifier, onClick: () -> Unit) {
    Row(
        modifier.selectable(selected, enabled = enabled, role = Role.RadioButton, onClick = onClick).padding(vertical = 4.dp),
        verticalAlignment = Alignment.CenterVertically,
    ) {
        RadioButton(selected = selected, onClick = null, enabled = enabled)
        Text(label, Modifier.padding(start = 4.dp))
    }
}

// A whole-number field that keeps the last valid value while the text is being edited.
@Composable
private fun NumberField(value: Int, label: String, enabled: Boolean, onValue: (Int) -> Unit) {
    OutlinedTextField(value.toString(), { text -> text.toIntOrNull()?.let(onValue) }, Modifier.width(200.dp),
        enabled = enabled, singleLine = true, label = { Text(label) },
        keyboardOptions = KeyboardOptions(keyboardType = KeyboardType.Number))
}
