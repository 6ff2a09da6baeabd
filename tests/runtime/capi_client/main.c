/* capi_client BUNDLE POLICY MAX_NEW_TOKENS PROMPT: streams the continuation to stdout, then prints the token ids
 * and the statistics JSON on stderr, the way an app uses libcosmoes (tests/runtime/test_capi.py runs it). */
#include <stdio.h>
#include <stdlib.h>

#include <cosmoes/cosmoes.h>

static int print_piece(const char *piece, int32_t id, void *user) {
  int *count = (int *)user;
  if (id >= 0) fprintf(stderr, "%s%d", *count ? "," : "ids: ", id), ++*count;
  fputs(piece, stdout);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  char options[256], params[64];
  int count = 0, status;
  cosmoes_session *session;
  char *stats;
  if (argc != 5) {
    fprintf(stderr, "usage: capi_client BUNDLE POLICY MAX_NEW_TOKENS PROMPT\n");
    return 2;
  }
  snprintf(options, sizeof options, "{\"policy\": \"%s\", \"threads\": 1}", argv[2]);
  snprintf(params, sizeof params, "{\"max_new_tokens\": %d}", atoi(argv[3]));
  session = cosmoes_open(argv[1], options);
  if (!session) {
    fprintf(stderr, "error: %s\n", cosmoes_last_error());
    return 2;
  }
  status = cosmoes_generate(session, argv[4], params, print_piece, &count);
  if (status != COSMOES_OK) {
    fprintf(stderr, "error: %s\n", cosmoes_last_error());
    cosmoes_close(session);
    return 2;
  }
  stats = cosmoes_stats_json(session);
  fprintf(stderr, "\nstats: %s\nversion: %s\n", stats ? stats : "null", cosmoes_version());
  cosmoes_free(stats);
  cosmoes_close(session);
  return 0;
}
