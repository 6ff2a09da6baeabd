// What the chat screen shows, as one immutable value the ViewModel publishes (plain JVM: no android.* imports), and
// the session options it stands for.
package org.cosmoes.demo

import java.io.File
import org.cosmoes.SessionOptions
import org.cosmoes.Stats

enum class PolicyKind(val label: String) { ALL("all"), SWAP("swap"), LRU("lru") }

/** OFF: the policy decides; AUTO: autoBudgetMb of the available memory; FIXED: the MB typed in. */
enum class BudgetKind { OFF, AUTO, FIXED }

/** What the app is doing now; anything but IDLE disables the controls that would start something else. */
enum class Busy { IDLE, IMPORTING, OPENING, GENERATING }

data class ChatState(
    val bundles: List<File> = emptyList(),
    val bundle: File? = null,
    val info: BundleInfo? = null,
    val policy: PolicyKind = PolicyKind.SWAP,
    val lruSlots: Int = 4,
    val budget: BudgetKind = BudgetKind.OFF,
    val fixedBudgetMb: String = "",
    val autoBudgetMb: Double? = null,  // from ActivityManager.MemoryInfo.availMem when the bundle was chosen
    val maxNewTokens: Int = 64,
    val prompt: String = "",
    val output: String = "",
    val busy: Busy = Busy.IDLE,
    val liveDecodeTokS: Double? = null,  // pieces per second since the first piece, while streaming
    val rssMb: Double? = null,  // VmRSS, sampled while generating
    val stats: Stats? = null,  // the library's statistics of the last generation
    val error: String? = null,
) {
    /** The policy string cosmoes_open takes: "all", "swap" or "lru:N". */
    val policyName: String get() = if (policy == PolicyKind.LRU) "lru:$lruSlots" else policy.label

    val canGenerate: Boolean get() = busy == Busy.IDLE && bundle != null && prompt.isNotBlank()

    /** The options to open the bundle with; IllegalArgumentException (shown as the error) for a budget that is not
     *  a positive number. The library checks everything else and names what it refuses. */
    fun sessionOptions(): SessionOptions = when (budget) {
        BudgetKind.OFF -> SessionOptions(policy = policyName)
        BudgetKind.AUTO -> SessionOptions(policy = policyName, budgetMb = requireNotNull(autoBudgetMb) {
            "no automatic budget yet: choose the bundle again"
        })
        BudgetKind.FIXED -> {
            val mb = fixedBudgetMb.trim().toDoubleOrNull()?.takeIf { it.isFinite() && it > 0 }
            SessionOptions(policy = policyName, budgetMb = requireNotNull(mb) {
                "memory budget '$fixedBudgetMb' is not a number of MB above 0"
            })
        }
    }
}
