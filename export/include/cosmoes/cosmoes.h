/* cosmoes.h: the C API of the CoSMoEs on-device runtime (libcosmoes).
 *
 * Runs an exported bundle (`cosmoes export --target android|ios|host`): the backbone stays resident and each
 * expert is its own ExecuTorch method, loaded when the router selects it and freed under the expert-cache policy
 * (CoSMoEs, Huber et al. 2025, section 3.4.2). Text goes in and out through the bundle's own tokenizer.
 *
 *   cosmoes_session *s = cosmoes_open("bundle", "{\"policy\": \"lru:4\"}");
 *   if (!s) { fprintf(stderr, "%s\n", cosmoes_last_error()); return 1; }
 *   if (cosmoes_generate(s, "Once upon a time", "{\"max_new_tokens\": 64}", print_piece, NULL) != COSMOES_OK)
 *     fprintf(stderr, "%s\n", cosmoes_last_error());
 *   char *stats = cosmoes_stats_json(s);   // latency, memory and expert traffic of the last generation
 *   cosmoes_free(stats);
 *   cosmoes_close(s);
 *
 * Conventions
 * - Every function that can fail returns NULL or a non-zero cosmoes_status and sets a one-line message for the
 *   calling thread, read with cosmoes_last_error(). No C++ exception crosses this API, and no bad argument, bundle
 *   or option crashes the process. (A bundle whose programs pass every check the loader makes but fail an
 *   assertion inside an ExecuTorch kernel still ends the process, as ExecuTorch aborts; see the README's "What
 *   loading a file promises".)
 * - Strings are UTF-8. Options and parameters are JSON objects (NULL or "" means all defaults); an unknown key or
 *   a value out of range is an error naming it.
 * - A session is used by one thread at a time. Closing it from another thread is safe once every call on it has
 *   returned. Sessions are independent: two may run at once on two threads.
 * - Memory returned by this API (cosmoes_stats_json, cosmoes_tokenizer_decode) is released with cosmoes_free.
 *
 * The header is plain C99; the library is C++17 inside.
 */
#ifndef COSMOES_H
#define COSMOES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define COSMOES_API __declspec(dllexport)
#else
#define COSMOES_API __attribute__((visibility("default")))
#endif

typedef enum cosmoes_status {
  COSMOES_OK = 0,
  COSMOES_INVALID_ARGUMENT = 1, /* a NULL pointer, malformed JSON, an unknown key, a value out of range */
  COSMOES_BAD_BUNDLE = 2,       /* the bundle or its tokenizer is missing, corrupt or unusable */
  COSMOES_TOO_LONG = 3,         /* the prompt plus max_new_tokens exceed the bundle's max_seq_len */
  COSMOES_RUNTIME_ERROR = 4,    /* running the model failed (out of memory, an ExecuTorch error) */
  COSMOES_CLOSED = 5            /* the session was closed */
} cosmoes_status;

typedef struct cosmoes_session cosmoes_session;
typedef struct cosmoes_tokenizer cosmoes_tokenizer;

/* Called once per generated token, in order. `piece` is the text that token completes: never half a UTF-8
 * character, so it may be "" (a character still in progress) and a later piece may carry several tokens' text.
 * `id` is the token id. Return 0 to go on, anything else to stop generating (cosmoes_generate then returns
 * COSMOES_OK). The end-of-text token is not passed on: generation stops there. */
typedef int (*cosmoes_token_callback)(const char *piece, int32_t id, void *user);

/* The library's version, e.g. "0.1.0". */
COSMOES_API const char *cosmoes_version(void);

/* The one-line message of the calling thread's last failure ("" if none). Valid until the thread's next call. */
COSMOES_API const char *cosmoes_last_error(void);

/* The status of the calling thread's last call that can fail (COSMOES_OK if it succeeded): how an app tells a bad
 * option from a bad bundle after cosmoes_open returned NULL. */
COSMOES_API int cosmoes_last_status(void);

/* Opens a bundle directory: reads and checks its manifest, verifies its programs (sha256 unless check_sha is
 * false), loads the backbone and the tokenizer. options_json keys (all optional):
 *   "policy": "all" | "swap" | "lru:N"  which experts stay resident (default "swap": only the current token's)
 *   "budget_mb": number > 0              derive the policy from a weight budget instead (the largest lru:N that
 *                                        fits; an error naming the minimum if not even top_k experts fit)
 *   "threads": 0..1024                   CPU threads; 0 = the bundle's recipe (one per core)
 *   "check_sha": true | false            verify each program's sha256 against the manifest (default true)
 *   "prefetch": true | false             start reading each MoE layer's experts while the layer before runs, as
 *                                        its router foretells them (int4 experts; default false)
 * Returns NULL on failure (see cosmoes_last_error). */
COSMOES_API cosmoes_session *cosmoes_open(const char *bundle_dir, const char *options_json);

/* Continues `prompt` (encoded with a leading begin-of-text token, as `cosmoes generate` does), streaming each new
 * token to on_token (which may be NULL). params_json keys (all optional):
 *   "max_new_tokens": >= 1 (default 64)   "temperature": >= 0, 0 = greedy (default 0)
 *   "top_p": in (0, 1] (default 1)         "seed": >= 0 (default 0)
 * Each call starts a new sequence. Returns COSMOES_OK (also when the callback stopped early) or an error status. */
COSMOES_API int cosmoes_generate(cosmoes_session *session, const char *prompt, const char *params_json,
                                 cosmoes_token_callback on_token, void *user);

/* The ids-level variant, for tests and benchmarks: no tokenizer, no end-of-text stop; exactly max_new_tokens ids
 * are generated after prompt_ids (n_prompt >= 1) and written to out_ids (out_capacity >= max_new_tokens). */
COSMOES_API int cosmoes_generate_ids(cosmoes_session *session, const int32_t *prompt_ids, size_t n_prompt,
                                     const char *params_json, int32_t *out_ids, size_t out_capacity,
                                     size_t *out_len);

/* Statistics of the last generation as one JSON object (the schema `cosmoes_runner --stats-json` and
 * `cosmoes bench` report: ttft_ms, prefill_tok_s, decode_tok_s, peak_rss_mb, expert_loads, exrep_mean, tokens,
 * resident_per_layer (the experts each layer holds at the end of the last generation), ...), or NULL before the
 * first generation or on failure. Free it with cosmoes_free. */
COSMOES_API char *cosmoes_stats_json(cosmoes_session *session);

/* Frees memory this API returned. NULL is ignored. */
COSMOES_API void cosmoes_free(void *pointer);

/* Forgets the current sequence and the routing history (resident experts stay loaded). NULL is ignored. */
COSMOES_API void cosmoes_reset(cosmoes_session *session);

/* Releases the session and everything it loaded. NULL is ignored; a session must be closed once. */
COSMOES_API void cosmoes_close(cosmoes_session *session);

/* The tokenizer alone (a bundle's tokenizer/ directory or its tokenizer.json), for apps that count or show
 * tokens. NULL on failure. */
COSMOES_API cosmoes_tokenizer *cosmoes_tokenizer_open(const char *path);

/* Encodes UTF-8 text (with a leading begin-of-text token when add_bos is non-zero) into ids[0..capacity); *n_ids
 * receives the count. If capacity is too small, returns COSMOES_INVALID_ARGUMENT with *n_ids set to the count
 * needed. */
COSMOES_API int cosmoes_tokenizer_encode(cosmoes_tokenizer *tokenizer, const char *text, int add_bos,
                                         int32_t *ids, size_t capacity, size_t *n_ids);

/* Decodes ids to UTF-8 text, leaving out special tokens (invalid byte sequences become U+FFFD). NULL on
 * failure; free the text with cosmoes_free. */
COSMOES_API char *cosmoes_tokenizer_decode(cosmoes_tokenizer *tokenizer, const int32_t *ids, size_t n_ids);

/* The end-of-text token id, or -1 for NULL. */
COSMOES_API int32_t cosmoes_tokenizer_eos(const cosmoes_tokenizer *tokenizer);

COSMOES_API void cosmoes_tokenizer_close(cosmoes_tokenizer *tokenizer);

#ifdef __cplusplus
}
#endif

#endif /* COSMOES_H */
